"""The API key: on a server started with api_key=..., every route but the open ones needs
"Authorization: Bearer <key>", or is answered 401 in OpenAI's error shape.

Open: GET /health (a load balancer or orchestrator probes it without secrets; it says "ok" and nothing
else), GET / (the chat page: a browser cannot send a header when it opens a URL, and the page is
static, holds no data and asks for the key to send with each API call it makes) and CORS preflights
(OPTIONS requests never carry credentials, by the Fetch standard). Everything else needs the key:
/v1/*, LitServe's /info, FastAPI's /docs, /redoc and /openapi.json, and unknown paths (no 404 tells a
caller without the key which routes exist).

ApiKeyGate is a plain ASGI middleware, so it runs before any route, body parsing or validation.
"""

from __future__ import annotations

import secrets

from fastapi.responses import JSONResponse

OPEN_ROUTES = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/")}


def key_accepted(expected: str, authorization: bytes | None) -> bool:
    scheme, _, key = (authorization or b"").partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(), expected.encode())


class ApiKeyGate:
    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self._open(scope):
            authorization = dict(scope["headers"]).get(b"authorization")
            if not key_accepted(self.key, authorization):
                error = {"message": "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                         "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
                response = JSONResponse({"error": error}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _open(scope) -> bool:
        return scope["method"] == "OPTIONS" or (scope["method"], scope["path"]) in OPEN_ROUTES
