"""The server's error responses, from the one exception <-> wire table (sandlot/_wire.py), which the
HTTP transport reads back: every error body is ``{"error": {"type": <exception name>, "message": ...}}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._agent.protocol import ProtocolError
from .._exceptions import AuthError, QuotaExceeded, SandlotError
from .._wire import status_for, to_wire

log = logging.getLogger("sandlot.server")


class Forbidden(AuthError):
    """A valid key whose role may not do this (a tenant's key on /metrics, an operator's on a sandbox): 403."""

    http_status = 403


_HTTP_TYPES = {400: "InvalidRequest", 401: "AuthError", 403: "AuthError", 404: "NotFound", 405: "InvalidRequest",
               413: "InvalidRequest", 415: "InvalidRequest", 422: "InvalidRequest", 429: "QuotaExceeded"}
error_detail = to_wire  # the NDJSON streams' "exception" events carry the same object


def error_response(exc: SandlotError) -> JSONResponse:
    status = status_for(exc)
    headers = {}
    if isinstance(exc, AuthError) and not isinstance(exc, Forbidden):
        headers["WWW-Authenticate"] = 'Bearer realm="sandlot"'
    if isinstance(exc, QuotaExceeded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after or 1)))
    if status >= 500:
        log.error("request failed: %s", exc)
    return JSONResponse({"error": to_wire(exc)}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            return "the body is not valid JSON: " + str(err.get("ctx", {}).get("error", err.get("msg")))
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(SandlotError)
    async def _sandlot(request: Request, exc: SandlotError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = _validation_message(exc)
        content_type = request.headers.get("content-type", "")
        if any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()) and content_type and "json" not in content_type:
            message = f"send the body as JSON with 'Content-Type: application/json' (got {content_type[:60]!r})"
        status = 400 if message.startswith("the body is not valid JSON") else 422
        return JSONResponse({"error": {"type": "InvalidRequest", "message": message}}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, SandlotError):  # FastAPI wraps errors raised while it reads a JSON body
            return error_response(exc.__cause__)
        kind = _HTTP_TYPES.get(exc.status_code, "SandlotError")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path[:200]} (the API is described at /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:200]} (see /docs)"
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Never expected; Starlette logs the traceback. The client still gets the usual error shape.
        return JSONResponse({"error": {"type": "SandlotError", "message": f"internal error: {type(exc).__name__} "
                                       "(logged on the server)"}}, status_code=500)

    @app.exception_handler(ProtocolError)
    async def _too_big(request: Request, exc: ProtocolError) -> JSONResponse:
        # Raised before anything is sent: a request whose message to the sandbox would exceed a frame.
        return JSONResponse({"error": {"type": "InvalidRequest",
                                       "message": f"the request is too large for one message to the sandbox ({exc}); "
                                                  "send big inputs as files"}}, status_code=400)
