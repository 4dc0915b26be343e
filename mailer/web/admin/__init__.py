"""The editors' admin UI under ``/admin``: compose, preview, test, blast, watch, erase.

One module per part of the UI, each with its own router; ``session`` holds what they
share (the signed session cookie, CSRF, flash messages, page rendering) and
``compose`` the statement page that editing, testing and blasting all return to.
The routers are joined here in the order their routes must be matched.
"""

from fastapi import APIRouter

from mailer.web.admin import blasts, bounces, login, queue, sending, site, statements, subscribers

router = APIRouter()
for part in (login, statements, sending, blasts, subscribers, queue, site, bounces):
    router.include_router(part.router)
