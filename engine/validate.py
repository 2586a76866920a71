"""Checks for values that cross into the engine. Each raises InvalidInput naming the field."""

from credit_engine.engine import keys, limits
from credit_engine.engine.errors import InvalidInput


def whole_number(value: object, field: str, minimum: int, maximum: int) -> int:
    # bool is an int in Python; a JSON `true` is not an amount.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"must be a whole number, got {type(value).__name__}")
    if value < minimum or value > maximum:
        raise InvalidInput(field, f"must be between {minimum} and {maximum}, got {value}")
    return value


def amount_pence(value: object, field: str = "amount_pence") -> int:
    return whole_number(value, field, 1, limits.amount_pence_max)


def org_id(value: object, field: str = "org_id") -> str:
    if not keys.is_org_id(value):
        raise InvalidInput(field, "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit")
    assert isinstance(value, str)
    return value


def call_id(value: object, field: str = "call_id") -> str:
    if not keys.is_call_id(value):
        raise InvalidInput(field, "must be 1-128 characters of A-Z a-z 0-9 _ . : - starting with a letter or digit")
    assert isinstance(value, str)
    return value


def idempotency_key(value: object, field: str = "idempotency_key") -> str:
    if not keys.is_idempotency_key(value):
        raise InvalidInput(field, "must be 1-255 printable ASCII characters without spaces")
    assert isinstance(value, str)
    return value
