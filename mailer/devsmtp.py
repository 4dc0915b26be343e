"""The embedded SMTP catcher for ``mailer dev``: keeps every message as an .eml file.

Files (not memory) so the inbox page works whatever process serves it, and a
developer can open a message in a real mail client.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

_counter = itertools.count()


class _Catcher:
    def __init__(self, inbox: Path) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        for rcpt in envelope.rcpt_tos:
            name = f"{time.time_ns()}-{next(_counter)}.eml"
            header = f"X-Dev-Envelope-To: {rcpt}\r\n".encode()
            (self.inbox / name).write_bytes(header + data)
        return "250 2.0.0 caught"


class DevSmtp:
    def __init__(self, inbox: Path, port: int, host: str = "127.0.0.1") -> None:
        inbox.mkdir(parents=True, exist_ok=True)
        self.inbox = inbox
        self._controller = Controller(
            _Catcher(inbox), hostname=host, port=port, decode_data=False, ready_timeout=10
        )

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


@dataclass(frozen=True)
class CaughtMessage:
    id: str
    to: str
    subject: str
    date: str
    message: EmailMessage

    def body(self, subtype: str) -> str | None:
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None:
            return None
        content = part.get_content()  # type: ignore[attr-defined]
        return content if isinstance(content, str) else None


def _load(path: Path) -> CaughtMessage:
    msg = message_from_bytes(path.read_bytes(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return CaughtMessage(
        id=path.stem,
        to=str(msg.get("X-Dev-Envelope-To", msg.get("To", ""))),
        subject=str(msg.get("Subject", "")),
        date=str(msg.get("Date", "")),
        message=msg,
    )


def list_messages(inbox: Path, limit: int = 200) -> list[CaughtMessage]:
    if not inbox.is_dir():
        return []
    files = sorted(inbox.glob("*.eml"), reverse=True)[:limit]
    return [_load(f) for f in files]


def get_message(inbox: Path, message_id: str) -> CaughtMessage | None:
    if not message_id.replace("-", "").isdigit():
        return None
    path = inbox / f"{message_id}.eml"
    return _load(path) if path.is_file() else None
