"""Bounded request bodies: a declared Content-Length over the limit is refused before anything is read,
and a chunked body is counted as it streams in (the upload fails with 413 once it passes the limit)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._exceptions import InvalidRequest


class BodyTooLarge(InvalidRequest):
    """The request body is larger than this server accepts (413)."""

    http_status = 413


class BodyLimit:
    def __init__(self, app: ASGIApp, json_limit: int, upload_limit: int) -> None:
        self.app = app
        self.json_limit = json_limit
        self.upload_limit = upload_limit

    def _limit(self, scope: Scope) -> int:
        # File uploads stream to the sandbox; everything else is a JSON document parsed in memory.
        if scope["method"] == "PUT" and scope["path"].endswith("/files"):
            return self.upload_limit
        return self.json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    from .errors import error_response

                    await error_response(BodyTooLarge(
                        f"the request body ({declared} bytes) is over this server's limit of {limit} bytes"))(
                        scope, receive, send)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"the request body is over this server's limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)
