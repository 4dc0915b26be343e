"""py-spy profiles of a process under test, summarised for docs/benchmarks.md.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;… count``); the
summary gives each function's share of the on-CPU samples, inclusive and self, and
the share of a few families of code (SQL, SMTP, Redis, arq …) that a reader can act on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import PYTHON

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")

# Families of code, first match wins, by the file a frame runs in.
FAMILIES: list[tuple[str, tuple[str, ...]]] = [
    ("SMTP client (aiosmtplib)", ("aiosmtplib/",)),
    ("SQL: SQLAlchemy", ("sqlalchemy/",)),
    ("SQL: asyncpg / aiosqlite driver", ("asyncpg/", "aiosqlite/", "sqlite3/")),
    ("Redis client", ("redis/",)),
    ("arq", ("arq/",)),
    ("web: uvicorn / starlette / fastapi", ("uvicorn/", "starlette/", "fastapi/", "h11/")),
    ("web: forms / validation", ("multipart/", "email_validator/", "pydantic")),
    ("templates (Jinja2)", ("jinja2/", "markupsafe/")),
    ("logging", ("logging/",)),
    ("mailer: render", ("mailer/render.py",)),
    ("mailer: tokens", ("mailer/tokens.py", "itsdangerous/", "hmac.py", "hashlib")),
    ("mailer: delivery", ("mailer/delivery/",)),
    (
        "mailer: SMTP (pool, pipelining; the write() syscall shows here)",
        ("mailer/smtp.py", "mailer/smtp_pipeline.py"),
    ),
    ("mailer: other", ("mailer/",)),
    ("asyncio / uvloop event loop", ("asyncio/", "uvloop/")),
]


LOOP_NAME = "event loop internals (uvloop C code: epoll, socket I/O, callbacks)"
LOOP_LEAVES = {
    "Worker.run (arq/worker.py)",
    "BaseEventLoop.run_until_complete (asyncio/base_events.py)",
    "run (asyncio/runners.py)",
    "Runner.run (asyncio/runners.py)",
    "Server.run (uvicorn/server.py)",
    "run (uvicorn/main.py)",
}


@dataclass
class Profile:
    samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    self_: Counter[str] = field(default_factory=Counter)
    families_self: Counter[str] = field(default_factory=Counter)
    families_incl: Counter[str] = field(default_factory=Counter)
    raw_path: str = ""

    def share(self, n: int) -> float:
        return 100.0 * n / self.samples if self.samples else 0.0


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def family_of(file: str) -> str:
    for name, markers in FAMILIES:
        if any(m in file for m in markers):
            return name
    return "other (stdlib, interpreter)"


def parse_raw(path: Path) -> Profile:
    prof = Profile(raw_path=str(path))
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        prof.samples += count
        names: list[tuple[str, str]] = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            if not m:
                continue
            file = _short(m.group("file"))
            names.append((f"{m.group('func')} ({file})", file))
        if not names:
            continue
        for name in {n for n, _ in names}:
            prof.inclusive[name] += count
        for fam in {family_of(f) for _, f in names}:
            prof.families_incl[fam] += count
        leaf_name, leaf_file = names[-1]
        if leaf_name in LOOP_LEAVES:
            # C code under the event loop's run() (uvloop: epoll, socket reads and writes,
            # callbacks' bookkeeping) has no Python frame of its own.
            leaf_name, leaf_file = LOOP_NAME, "uvloop/"
            names.append((leaf_name, leaf_file))
        prof.self_[leaf_name] += count
        # Self time by family: the innermost frame that belongs to a named family, so time
        # in the interpreter's own helpers is charged to the library that called them.
        for _, file in reversed(names):
            fam = family_of(file)
            if not fam.startswith("other"):
                prof.families_self[fam] += count
                break
        else:
            prof.families_self[family_of(leaf_file)] += count
    return prof


class Recorder:
    """``py-spy record`` attached to a running process until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.procs: list[subprocess.Popen[bytes]] = []
        self.available = (
            shutil.which("py-spy") is not None or (Path(PYTHON).parent / "py-spy").exists()
        )

    def _binary(self) -> str:
        local = Path(PYTHON).parent / "py-spy"
        return str(local) if local.exists() else "py-spy"

    def start(self) -> None:
        if not self.available:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.raw = self.out.with_suffix(".txt")
        cmd = [self._binary(), "record", "--pid", str(self.pid), "--rate", str(self.rate)]
        extra = os.environ.get("BENCH_PYSPY_FLAGS", "").split()
        cmd += ["--format", "raw", "-o", str(self.raw), *extra]
        if "--native" not in extra:  # native stacks need the target paused while sampled
            cmd.append("--nonblocking")
        self.raw.unlink(missing_ok=True)
        self.command = " ".join(cmd)
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(0.3)

    def stop(self) -> Profile | None:
        if not self.available or not self.procs:
            return None
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not self.raw.exists():
            return None
        return parse_raw(self.raw)


def summary_rows(prof: Profile, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    return {
        "families_self": [(k, prof.share(v)) for k, v in prof.families_self.most_common()],
        "self": [(k, prof.share(v)) for k, v in prof.self_.most_common(top)],
        "inclusive": [
            (k, prof.share(v))
            for k, v in prof.inclusive.most_common()
            if "(mailer/" in k and "(mailer/cli/" not in k
        ][:top],
    }
