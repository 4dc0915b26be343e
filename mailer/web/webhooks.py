"""``POST /webhooks/{ses,postmark,sendgrid,mailgun}``: provider bounce and complaint events.

Every route does the same four things, in this order, and writes nothing before the
third:

1. read the body, at most the provider's cap (413 past it), before anything else;
2. authenticate it the provider's way (``mailer/bounces/providers/``): 401 when the
   request carries no credentials or signature, 403 when they are wrong or stale, 404
   while the provider is not configured;
3. map it to events (400 for a body that is not the JSON the provider sends) and hand
   them to the bounce pipeline, which stores each once by its fingerprint: a provider
   retrying, or anyone replaying a captured request, changes nothing more;
4. answer 200 with counts, also for event types that mean nothing to us (stored as
   ignored, or skipped when they are deliveries, opens, clicks), because providers
   retry every non-2xx answer. 503 only when the database is down: then the retry is
   what we want.

Set-up per provider (URLs, settings): docs/deploy.md, "Provider webhooks".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mailer.bounces import IngestResult, IngestUnavailable
from mailer.bounces.providers import common, mailgun, postmark, sendgrid, ses
from mailer.bounces.providers.common import Received, Rejected
from mailer.bounces.providers.sns import SnsVerifier
from mailer.web.context import get_ctx

log = logging.getLogger("mailer.webhooks")

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class Answer(BaseModel):
    received: int  # events in the request
    stored: int  # new events stored (and acted on)
    duplicates: int  # events already stored: a retry or a replay, changed nothing
    skipped: int  # deliveries, opens, clicks: not bounces, not stored
    events: list[str]  # what each event did, one line each (the first 20)
    detail: str | None = None  # e.g. "subscription to … confirmed"


class Refusal(BaseModel):
    detail: str


def _doc() -> dict[str, Any]:
    """OpenAPI for a webhook route: every answer it gives. The body is the provider's own
    raw JSON (read, and for SendGrid verified, as bytes), so it is not described here."""
    refusals = {
        400: "the body is not the JSON this provider sends",
        401: "no credentials or signature",
        403: "wrong credentials, a signature that does not verify, stale or replayed",
        404: "this provider's webhook is not configured",
        413: "the body is over this provider's cap",
        503: "the database is unavailable: the provider should retry",
    }
    return {
        "responses": {200: {"model": Answer}}
        | {code: {"model": Refusal, "description": why} for code, why in refusals.items()},
    }


async def _body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = common.number(request.headers.get("content-length"), 20)
    if declared is not None and declared > limit:
        raise Rejected(413, f"request body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Rejected(413, f"request body larger than {limit} bytes")
    return bytes(body)


def _sns(request: Request) -> SnsVerifier:
    """One verifier per app, so its certificate cache lives as long as the process.
    ``app.state.sns_transport`` (an httpx transport) is where its requests go; unset,
    they go to the network."""
    state = request.app.state
    verifier = getattr(state, "sns_verifier", None)
    if not isinstance(verifier, SnsVerifier):
        verifier = state.sns_verifier = SnsVerifier(getattr(state, "sns_transport", None))
    return verifier


def _answer(provider: str, received: Received, results: list[IngestResult]) -> JSONResponse:
    stored = [r for r in results if not r.duplicate]
    body: dict[str, object] = {
        "received": len(results) + received.skipped,
        "stored": len(stored),
        "duplicates": len(results) - len(stored),
        "skipped": received.skipped,
        "events": [r.summary for r in results[:20]],
    }
    if received.note:
        body["detail"] = received.note
    for r in stored:
        log.info("webhook %s: %s", provider, r.summary, extra={"provider": provider})
    return JSONResponse(body)


async def _run(
    request: Request,
    provider: str,
    limit: int,
    read: Callable[[bytes], Awaitable[Received]],
    on_failure: Callable[[], Awaitable[None]] | None = None,
    check: Callable[[], None] | None = None,
) -> JSONResponse:
    """``check`` (credentials outside the body), read the body, ``read`` it (verify and
    map), deliver the events; ``on_failure`` undoes what ``read`` kept if delivery fails."""
    runtime = get_ctx(request).runtime
    try:
        if check is not None:
            check()
        body = await _body(request, limit)
        received = await read(body)
    except Rejected as exc:
        log.warning("webhook %s refused (%s): %s", provider, exc.status, exc.detail)
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)
    try:
        results = await common.deliver(runtime, received.events)
    except BaseException as exc:
        if on_failure is not None:
            await on_failure()
        if not isinstance(exc, IngestUnavailable):
            raise
        log.error("webhook %s: %s; the provider will retry", provider, exc)
        return JSONResponse({"detail": f"{exc}; try again later"}, 503)
    return _answer(provider, received, results)


@router.post("/ses", **_doc())
async def ses_webhook(request: Request) -> JSONResponse:
    """Amazon SES notifications through SNS (signature, topic and certificate checked)."""
    settings = get_ctx(request).runtime.settings

    async def read(body: bytes) -> Received:
        kind = request.headers.get("x-amz-sns-message-type")
        return await ses.receive(settings, _sns(request), body, kind)

    return await _run(request, ses.PROVIDER, ses.MAX_BYTES, read)


@router.post("/postmark", **_doc())
async def postmark_webhook(request: Request) -> JSONResponse:
    """Postmark bounce and spam-complaint records (HTTP basic auth)."""
    settings = get_ctx(request).runtime.settings

    def check() -> None:  # the credentials, before the body is even read
        postmark.authenticate(settings, request.headers.get("authorization"))

    async def read(body: bytes) -> Received:
        return postmark.receive(body)

    return await _run(request, postmark.PROVIDER, postmark.MAX_BYTES, read, check=check)


@router.post("/sendgrid", **_doc())
async def sendgrid_webhook(request: Request) -> JSONResponse:
    """SendGrid's signed event webhook (ECDSA over timestamp + raw body)."""
    settings = get_ctx(request).runtime.settings

    async def read(body: bytes) -> Received:
        sendgrid.verify(
            settings,
            request.headers.get(sendgrid.SIGNATURE_HEADER),
            request.headers.get(sendgrid.TIMESTAMP_HEADER),
            body,
            time.time(),
        )
        return sendgrid.receive(body)

    return await _run(request, sendgrid.PROVIDER, sendgrid.MAX_BYTES, read)


@router.post("/mailgun", **_doc())
async def mailgun_webhook(request: Request) -> JSONResponse:
    """Mailgun webhooks (HMAC of timestamp + token; each token used once)."""
    runtime = get_ctx(request).runtime
    used: list[str] = []

    async def read(body: bytes) -> Received:
        mailgun.configured(runtime.settings)
        doc = common.parse_json(body)
        token = mailgun.verify(runtime.settings, doc, time.time())
        await mailgun.claim(runtime.redis, runtime.keys, runtime.settings, token)
        used.append(token)
        assert isinstance(doc, dict)  # verify() refused anything else
        return mailgun.receive(doc, len(body), token)

    async def release() -> None:
        for token in used:
            await mailgun.release(runtime.redis, runtime.keys, token)

    return await _run(request, mailgun.PROVIDER, mailgun.MAX_BYTES, read, release)
