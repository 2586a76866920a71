"""JSON responses, and the one error shape every 4xx/5xx of ours uses:
`{"error": {"code", "message", "field"?}}`."""

from typing import Any

import orjson
from starlette.responses import JSONResponse, Response


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return OrjsonResponse(body, status_code=status_code, headers=headers)


def error_response(
    status_code: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(details or {})
    return OrjsonResponse({"error": error}, status_code=status_code, headers=headers)


class ApiError(Exception):
    """Raised by an endpoint to answer with an error; mapped by the app's exception handlers."""

    def __init__(
        self, status_code: int, code: str, message: str, field: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.details = details  # more of the error's own fields (the amounts a refusal is about)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        headers = dict(headers or {})
        if self.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status_code == 503:
            headers["Retry-After"] = "1"
        return error_response(self.status_code, self.code, self.message, self.field, headers, self.details)
