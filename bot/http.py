"""HTTP plumbing shared by both HTTP doors and our own outgoing calls.

A low module (no replyclock imports): `bot.web` and `bot.slack.app` read request bodies through
`read_body`.
"""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (without reading on) anything over `limit` bytes.

    Raises:
        BodyTooLarge: Content-Length or the bytes actually received exceed `limit`.
        ValueError: the Content-Length header is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ValueError("Content-Length is not a number")
        if int(declared) > limit:
            raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
