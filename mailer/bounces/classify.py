"""What a bounce means: hard, soft, policy or nothing, from its status code and wording.

The SMTP reply rules are ``mailer.smtp.RULES``, the same table the sender uses
while talking to the receiving server, so a ``550 5.1.1`` refused during the
transaction and a DSN saying ``Status: 5.1.1`` days later are one kind of event.
Two things are added on top, both for reports that arrive after the fact:

- A DSN's ``Action``: ``delayed`` is a soft bounce whatever its code, and
  ``delivered``/``relayed``/``expanded`` are not bounces at all.
- Wording, only when there is no specific enhanced code (none, or a generic
  ``x.0.0`` as Exim writes): "mailbox full" is soft, "spam"/"blocked" is the
  sender's problem (policy), "user unknown" is hard. Policy words are checked
  before hard ones because a policy rejection wrongly taken as hard would drop a
  live subscriber, the one mistake that cannot be seen or undone.

Policy (5.7.x, most 554) is never blamed on the subscriber (docs/bounces.md).
"""

from __future__ import annotations

import re

from mailer.models import BounceKind
from mailer.smtp import Verdict, classify

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

_FULL = re.compile(
    r"mailbox (is )?full|over ?quota|quota exceeded|exceeded (its )?storage|storage exceeded"
    r"|insufficient (system )?storage|mailbox size limit",
    re.I,
)
_POLICY = re.compile(
    r"spam|\bblock(ed|list)\b|black ?list|\brbl\b|spamhaus|reputation|\bpolicy\b|dmarc|\bspf\b"
    r"|dkim|unsolicited|rate limit|too many (messages|connections)|content rejected"
    r"|not authori[sz]ed|authentication|sender address rejected|relay(ing)? (access )?denied",
    re.I,
)
_HARD = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient|address|account|person)"
    r"|(mailbox|account|address|user|recipient)( name)? (does not|doesn't|does n't) exist"
    r"|does not exist|invalid (recipient|mailbox|address)|unrouteable address"
    r"|unknown (local[- ]part|recipient|mailbox|address)|mailbox not found|no mailbox here"
    r"|account (has been |is )?(disabled|deactivated|closed|inactive)"
    r"|doesn't have an? [\w.-]+ account|not a valid (user|mailbox|recipient)",
    re.I,
)
_TRANSIENT = re.compile(r"try again later|temporar|greylist|deferred|\bdelayed\b", re.I)

_FROM_VERDICT = {
    Verdict.retry: BounceKind.soft,
    Verdict.bounce: BounceKind.hard,
    Verdict.policy: BounceKind.policy,
}


def _specific(enhanced: str | None) -> bool:
    return bool(enhanced) and not str(enhanced).endswith(".0.0")


def effective_status(status: str | None, diagnostic: str | None) -> str | None:
    """The enhanced code that counts: the Status field, unless it is missing or generic
    (``5.0.0``, as Exim writes) and the diagnostic carries a specific one."""
    if _specific(status):
        return status
    found = _ENHANCED.search(diagnostic or "")
    if found is not None and (_specific(found.group(0)) or not status):
        return found.group(0)
    return status


def _by_words(text: str) -> BounceKind | None:
    if _FULL.search(text):
        return BounceKind.soft
    if _POLICY.search(text):
        return BounceKind.policy
    if _HARD.search(text):
        return BounceKind.hard
    if _TRANSIENT.search(text):
        return BounceKind.soft
    return None


def kind_for(
    *,
    status: str | None = None,
    code: int | None = None,
    diagnostic: str | None = None,
    action: str | None = None,
) -> BounceKind | None:
    """The kind of one recipient's bounce; None when nothing in it says anything.

    ``status`` is the enhanced code (``5.1.1``), ``code`` the SMTP reply (``550``),
    ``diagnostic`` the server's words, ``action`` a DSN's Action field.
    """
    action = (action or "").strip().lower()
    if action in ("delivered", "relayed", "expanded"):
        return BounceKind.ignored
    if action == "delayed":
        return BounceKind.soft
    text = diagnostic or ""
    enhanced = effective_status(status, text)
    if enhanced and enhanced.startswith("2."):
        return BounceKind.ignored
    if not _specific(enhanced) and (worded := _by_words(text)) is not None:
        return worded
    if code is None and enhanced:
        code = int(enhanced[0]) * 100  # class only: lets RULES match on the status code
    if code is None:
        return None
    if 200 <= code < 400:
        return BounceKind.ignored
    verdict = classify(code, f"{enhanced or ''} {text}")
    if verdict is Verdict.reject:
        # Permanent, but not the address's fault: mailbox full (5.2.2, 552) is soft;
        # the rest (message too big, syntax) is the sender's to fix.
        full = (enhanced or "").startswith("5.2.2") or (code == 552 and not _specific(enhanced))
        return BounceKind.soft if full else BounceKind.policy
    return _FROM_VERDICT[verdict]


def kind_for_feedback(feedback_type: str | None) -> BounceKind:
    """An ARF report's Feedback-Type (RFC 5965 §7.3) → what it means for the subscriber."""
    kind = (feedback_type or "abuse").strip().lower()
    if kind in ("not-spam", "auth-failure"):  # a correction, or a DMARC failure report
        return BounceKind.ignored
    if kind == "virus":
        return BounceKind.policy
    return BounceKind.complaint  # abuse, fraud, other
