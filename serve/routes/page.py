"""``GET /``: the chat page, one static file shipped with the package (no CDN, no build step).

The page itself is public (it holds no data); it asks for the API key, when the server has one, and sends it with
its calls to the OpenAI routes.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

PAGE = Path(__file__).resolve().parents[1] / "static" / "chat.html"


async def chat_page(request: Request) -> Response:
    return FileResponse(
        PAGE,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            # Everything the page needs comes from this server: no script or style from anywhere else.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
        },
    )
