"""Errors the engine raises for bad input (operating errors are Outcome values, not exceptions)."""


class InvalidInput(ValueError):
    """A caller passed something the engine refuses. `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OrgNotFound(LookupError):
    def __init__(self, org_id: str) -> None:
        super().__init__(f"org {org_id!r} does not exist")
        self.org_id = org_id


class OrgExists(ValueError):
    def __init__(self, org_id: str) -> None:
        super().__init__(f"org {org_id!r} already exists")
        self.org_id = org_id
