"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`api_error` builds one; `install(app)` makes the framework's own errors take the same shape: unknown
routes (404), wrong methods (405), bodies that are not JSON or not UTF-8, request-model validation
(answered 400, as OpenAI does, naming the field), oversized bodies (413) and anything unforeseen (500).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, so no text in an error can fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def api_error(status: int, message: str, param: str | None = None, code: str | None = None) -> HTTPException:
    return HTTPException(status, {"message": message, "type": error_type(status), "param": param, "code": code})


def field_path(parts) -> str:
    """OpenAI's name for a place in the body: ("messages", 0, "content") -> "messages[0].content"."""
    path = ""
    for part in parts:
        name = str(part).encode("utf-8", "backslashreplace").decode("utf-8")  # a key may be a lone surrogate
        path += f"[{name}]" if isinstance(part, int) else (f".{name}" if path else name)
    return path


def error_body(e: StarletteHTTPException) -> dict:
    """The inside of {"error": ...} for any HTTPException, ours (detail is that dict) or the framework's."""
    if isinstance(e.detail, dict):
        return e.detail
    return {"message": str(e.detail), "type": error_type(e.status_code), "param": None, "code": None}


def error_of(e: Exception) -> dict:
    """The inside of {"error": ...} for any exception (an event of a stream that already answered 200)."""
    if isinstance(e, StarletteHTTPException):
        return error_body(e)
    return {"message": f"internal server error ({type(e).__name__})", "type": "server_error", "param": None,
            "code": None}


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    body = error_body(exc)
    if exc.status_code == 404 and not isinstance(exc.detail, dict):
        body = {**body, "message": f"Invalid URL ({request.method} {request.url.path})"}
    elif exc.status_code == 405:
        body = {**body, "message": f"{request.method} is not allowed on {request.url.path}"}
    elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's words
        body = {**body, "message": "the request body could not be read: send a JSON object, encoded in UTF-8"}
    return ErrorResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset)
        at = first.get("loc", (None, "?"))[-1]
        message, where = f"malformed JSON body (at character {at}): {first.get('ctx', {}).get('error', '')}", ""
    else:
        where = field_path(p for p in first.get("loc", ()) if p != "body" and not _union_member(p))
        message = f"invalid request: {first.get('msg', 'malformed body')}" + (f" (at {where})" if where else
                                                                             " (send a JSON object)")
    return ErrorResponse({"error": {"message": message, "type": "invalid_request_error", "param": where or None,
                                    "code": None}}, status_code=400)


def _union_member(part) -> bool:
    """Pydantic names the member of a union it tried ("str", "list[dict[any,any]]"): not a place in the body."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or part.startswith(("list[", "dict[")))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ErrorResponse({"error": {"message": f"internal server error ({type(exc).__name__})",
                                    "type": "server_error", "param": None, "code": None}}, status_code=500)


def install(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""
    app.add_exception_handler(StarletteHTTPException, http_error)  # FastAPI's HTTPException is a subclass
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
