"""The sign-up form for the campaign site: ``GET /embed.js`` and the copy-paste snippet.

The snippet is a plain HTML form that works without JavaScript (it posts to
``/subscribe`` and, with a ``redirect`` on an allowed origin, comes back to the site);
the optional ``/embed.js`` posts it with ``fetch`` and shows the answer in place.
Which sites may post it is ``MAILER_ALLOWED_ORIGINS`` (``mailer/web/cors.py``).
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

from fastapi import APIRouter, Request, Response

from mailer.config import Settings
from mailer.web.cors import site_redirect

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


class SnippetError(ValueError):
    """A snippet option that cannot work; the message says which and why."""


def form_snippet(
    settings: Settings,
    *,
    source: str = "",
    redirect: str | None = None,
    script: bool = True,
    button: str = "Get updates",
) -> str:
    """The HTML an editor pastes into the site: a plain form (email, optional name, the
    honeypot, ``source`` and ``redirect`` fields) and, with ``script``, the tag of
    ``/embed.js``. ``redirect`` must be on an allowed origin, else SnippetError: the
    server would ignore it anyway."""
    base = settings.base_url
    if redirect and site_redirect(settings, redirect) is None:
        raise SnippetError(
            f"redirect: {redirect!r} is not on an origin in MAILER_ALLOWED_ORIGINS, "
            "so the form would not go back there"
        )

    def esc(value: str) -> str:
        return html.escape(value, quote=True)

    lines = [
        f'<form class="mailer-form" action="{esc(base)}/subscribe" method="post" data-mailer-form>',
        '  <label>Email address <input type="email" name="email" required maxlength="254" '
        'autocomplete="email"></label>',
        '  <label>Name (optional) <input type="text" name="name" maxlength="200" '
        'autocomplete="name"></label>',
        '  <div hidden aria-hidden="true"><label>Leave this field empty '
        '<input type="text" name="website" tabindex="-1" autocomplete="off"></label></div>',
        f'  <input type="hidden" name="source" value="{esc(source[:200])}">',
    ]
    if redirect:
        lines.append(f'  <input type="hidden" name="redirect" value="{esc(redirect)}">')
    lines += [
        f'  <button type="submit">{esc(button)}</button>',
        '  <p data-mailer-message role="status" aria-live="polite"></p>',
        "</form>",
    ]
    if script:
        lines.append(f'<script src="{esc(base)}/embed.js" defer></script>')
    return "\n".join(lines) + "\n"
