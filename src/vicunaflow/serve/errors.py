"""OpenAI-style errors and request bodies, shared by the API (app.py) and the arena (arena.py)."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect


class APIError(Exception):
    """An error returned to the client as OpenAI's {"error": {...}} body."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None, param=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 413:  # the rest of the body is not read: the connection cannot carry another request
            headers = {"Connection": "close"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        """The error as a server-sent event, for failures after a stream has started."""
        return sse_event(self.body())


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `max_bytes`: by Content-Length before
    reading anything (uvicorn sends `100 Continue` only when reading starts), else while it streams in."""
    too_large = APIError(
        413,
        f"The request body exceeds this server's limit of {max_bytes} bytes (serve --max-body-bytes).",
        code="request_too_large",
    )
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
    except ClientDisconnect:  # gone before its body arrived: nothing to answer, nothing went wrong here
        raise APIError(499, "the client closed the connection before its request body arrived") from None
    return bytes(body)


def describe(errors: list) -> str:
    """pydantic's validation errors as `field: problem`, the first three: never the input values (which in the
    arena hold the model's name, and in any request the user's text)."""
    problems = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(problems)


def invalid_body(errors: list) -> APIError:
    """400 for a body that failed validation, described as `describe` does, its `param` the request field
    of the first problem (as this server's own checks name theirs: "messages", not "messages.0.role");
    None when the body is not JSON or not an object."""
    fields = [e["loc"][0] for e in errors[:1] if e.get("loc") and isinstance(e["loc"][0], str)]
    return APIError(400, "Invalid request body: " + describe(errors), param=fields[0] if fields else None)


def sse_event(data: dict | str) -> str:
    """One server-sent event carrying `data` (a JSON object, or a ready string such as [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
