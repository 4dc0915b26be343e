"""CPU per message of building a blast message ready for DATA, both ways, in one process.

    python bench/wire_micro.py [--messages 20000] [--repeats 5]

*build + wire_message*: ``CompiledMessage.build`` (bytes), then what the SMTP code did
with them before the wire form existed: count line ends, look for dots, copy the
message to add the final dot (``smtp_pipeline.wire_message``). *wire*:
``CompiledMessage.wire``, the shared parts converted once per blast. Both get the same
per-recipient values (a real ``u1`` unsubscribe URL and an HMAC Message-ID, made once
beforehand so only the message is timed) and must give the same bytes; the two are
timed in turn, ``repeats`` times, and the medians (min–max) printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from common import STATEMENT_MD

from mailer.config import load_settings
from mailer.render import Renderer, StatementContent, make_message_id
from mailer.smtp_pipeline import wire_message
from mailer.statements import render_markdown
from mailer.tokens import Tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    settings = load_settings(
        env="dev", secret_key="wire-micro-secret-key-0123456789abcdef", smtp_host="127.0.0.1"
    )
    html, text = render_markdown(STATEMENT_MD)  # the statement of the harness's blasts
    content = StatementContent("A statement about the campaign", html, text, "The team", None)
    compiled = Renderer(settings).compile_statement(content, blast_id=1)
    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    values = [
        {
            "to": f"reader{i}@example.com",
            "unsubscribe_url": f"{settings.base_url}/unsubscribe/{tokens.unsubscribe(i)}",
            "message_id": make_message_id(settings, 1, i),
        }
        for i in range(args.messages)
    ]

    def before(v: dict[str, Any]) -> tuple[bytes, int]:
        return wire_message(compiled.build(**v))

    def after(v: dict[str, Any]) -> tuple[bytes, int]:
        w = compiled.wire(**v)
        return w.data, w.size

    assert all(before(v) == after(v) for v in values[:200])
    ways: dict[str, Callable[[dict[str, Any]], tuple[bytes, int]]] = {
        "build + wire_message": before,
        "wire": after,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            started = time.process_time()
            for v in values:
                way(v)
            times[name].append((time.process_time() - started) / len(values) * 1e6)
    size = len(compiled.build(**values[0]))
    print(f"{args.messages:,} messages of {size:,} bytes, {args.repeats} repeats in turn:")
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts):.2f} µs CPU/msg ({min(ts):.2f}–{max(ts):.2f})")


if __name__ == "__main__":
    main()
