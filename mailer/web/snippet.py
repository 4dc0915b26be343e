"""The copy-paste HTML an editor puts on the campaign site: the sign-up form (and, optionally,
the tag of ``/embed.js``, served by ``mailer/web/site_form.py``).

Shown on the admin's "Form for your site" page; kept out of the router modules so that
page can use it (web routers never import each other, docs/design.md#how-the-code-is-arranged).
"""

from __future__ import annotations

import html

from mailer.config import Settings
from mailer.web.cors import site_redirect


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
