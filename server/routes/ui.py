"""The mask-painting web page: static files, no CDN."""

from __future__ import annotations

import html
import mimetypes
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse

from ..protocol import not_found
from ..state import AppState, get_state

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, state: AppState = Depends(get_state)):
    page = UI_DIR / "index.html"
    if not page.is_file():
        return HTMLResponse("<h1>flux-fill-server</h1><p>The web page is not installed.</p>")
    text = page.read_text(encoding="utf-8")
    prefix = state.settings.prefix if request.url.path.startswith(state.settings.prefix + "/") and state.settings.prefix else ""
    text = text.replace('<meta name="api-base" content="">', f'<meta name="api-base" content="{html.escape(prefix)}">')
    return HTMLResponse(text, headers={"Cache-Control": "no-cache"})


@router.get("/ui/{path:path}")
async def asset(path: str):
    target = (UI_DIR / path).resolve()
    if not target.is_file() or UI_DIR not in target.parents:
        raise not_found()
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".js":
        media = "text/javascript"
    return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})
