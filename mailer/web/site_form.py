"""The sign-up form for the campaign site: ``GET /embed.js`` and the copy-paste snippet.

The snippet is a plain HTML form that works without JavaScript (it posts to
``/subscribe`` and, with a ``redirect`` on an allowed origin, comes back to the site);
the optional ``/embed.js`` posts it with ``fetch`` and shows the answer in place.
Which sites may post it is ``MAILER_ALLOWED_ORIGINS`` (``mailer/web/cors.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request, Response

# The snippet lives in web/snippet.py so the admin page can show it without importing a
# router; these names stay importable from here.
from mailer.web.snippet import SnippetError as SnippetError
from mailer.web.snippet import form_snippet as form_snippet

router = APIRouter()

EMBED_JS = (Path(__file__).resolve().parent / "static" / "embed.js").read_bytes()
_EMBED_ETAG = '"' + hashlib.sha256(EMBED_JS).hexdigest()[:32] + '"'
EMBED_CACHE_S = 3600  # sites embed it on every page: cached, revalidated by ETag


@router.get("/embed.js", include_in_schema=False)
async def embed_js(request: Request) -> Response:
    headers = {
        "Cache-Control": f"public, max-age={EMBED_CACHE_S}",
        "ETag": _EMBED_ETAG,
        # Loaded by the site's pages: allowed even where they set COEP.
        "Cross-Origin-Resource-Policy": "cross-origin",
    }
    if request.headers.get("if-none-match") == _EMBED_ETAG:
        return Response(status_code=304, headers=headers)
    return Response(EMBED_JS, media_type="text/javascript; charset=utf-8", headers=headers)
