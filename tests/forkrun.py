"""Short `mailer` commands for tests, forked from a process that has imported mailer.

Starting `mailer` costs about a second of CPU on this kind of machine, nearly all of it
importing SQLAlchemy, pydantic, redis and typer, and many tests run short commands
(`mailer editors add`, `mailer subscribers import`, ...). The eight test files that run
most of them took 194 core-seconds with a fresh process per command and 135 with this
(docs/testing.md). Here a fork server per pytest process imports every module of mailer once;
each command then runs in a fresh ``fork`` of it: a real process with its own argv,
environment, working directory, stdin, stdout, stderr and exit status, running
``mailer.cli.main`` as the console script does, and exiting through the interpreter's
normal shutdown (atexit handlers, stream flushes). Only the imports are shared.

What this cannot show, and where it is shown instead:
- The console script and interpreter start-up: every test that starts a long-lived
  process (`mailer worker`, `mailer serve`, `mailer dev`) execs ``.venv/bin/mailer``.
- Module-level reads of the environment see the pytest process's environment (which
  conftest has already cleaned of ``MAILER_*``). Mailer has one: the name of the env file
  (``MAILER_ENV_FILE``, config.py), which conftest sets to /dev/null for every test.

The server is single-threaded and imports nothing that starts a thread, so forking it
is safe. One command runs at a time per pytest process (a lock); tests that need two at
once use ``subprocess`` directly.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_server: _ForkServer | None = None


class _ForkServer:
    def __init__(self) -> None:
        to_server, self._requests = os.pipe()
        self._replies, from_server = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(to_server), str(from_server)],
            pass_fds=(to_server, from_server),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_server)
        os.close(from_server)
        atexit.register(self.stop)
        self._buffer = b""
        if self._line(timeout=120) != "ready":
            raise RuntimeError("the mailer fork server did not start")

    def _line(self, timeout: float | None) -> str | None:
        """The next line from the server; None if none came within ``timeout``."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._replies, 4096)
            if not chunk:
                raise RuntimeError(f"the mailer fork server exited ({self.proc.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        """Close the request pipe: the server reads its end and exits."""
        os.close(self._requests)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._replies)

    def run(self, request: dict[str, Any], timeout: float) -> int:
        os.write(self._requests, json.dumps(request).encode() + b"\n")
        pid = int(self._line(timeout=60) or "0")
        if not pid:
            raise RuntimeError("the mailer fork server did not fork")
        code = self._line(timeout=timeout)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            self._line(timeout=60)
            raise subprocess.TimeoutExpired(request["argv"], timeout)
        return int(code)


def run_mailer(
    args: list[str],
    *,
    env: dict[str, str],
    input: bytes | str | None = None,  # noqa: A002 - subprocess.run's name
    text: bool = True,
    timeout: float = 60,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[Any]:
    """Like ``subprocess.run([MAILER, *args], capture_output=True, ...)``, forked."""
    global _server
    with _lock, tempfile.TemporaryDirectory(prefix="mailer-run-") as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
        data = input.encode() if isinstance(input, str) else (input or b"")
        Path(files["stdin"]).write_bytes(data)
        request = {
            "argv": ["mailer", *args],
            "env": env,
            "cwd": str(cwd or os.getcwd()),
            **files,
        }
        if _server is None or _server.proc.poll() is not None:
            _server = _ForkServer()
        code = _server.run(request, timeout)
        out, err = Path(files["stdout"]).read_bytes(), Path(files["stderr"]).read_bytes()
    if text:
        return subprocess.CompletedProcess(args, code, out.decode(), err.decode())
    return subprocess.CompletedProcess(args, code, out, err)


# The server side -------------------------------------------------------------------------


def _import_mailer() -> None:
    """Every module a command may import, except the migration scripts (alembic runs
    those itself, and importing them outside alembic fails)."""
    import importlib
    import pkgutil

    import mailer

    for module in pkgutil.walk_packages(mailer.__path__, "mailer."):
        if not module.name.startswith("mailer.migrations"):
            importlib.import_module(module.name)


def _serve(requests: int, replies: int) -> dict[str, Any]:
    """Fork once per request; return the request in the child, never in the server."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = os.read(requests, 65536)
            if not chunk:  # the pytest process is gone
                os._exit(0)
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        request: dict[str, Any] = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.close(requests)
            os.close(replies)
            return request
        os.write(replies, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(replies, f"{os.waitstatus_to_exitcode(status)}\n".encode())


def _become(request: dict[str, Any]) -> None:
    """Turn this forked child into `mailer ARGS` with the request's streams and env."""
    for fd, name, flags in (
        (0, "stdin", os.O_RDONLY),
        (1, "stdout", os.O_WRONLY | os.O_TRUNC),
        (2, "stderr", os.O_WRONLY | os.O_TRUNC),
    ):
        opened = os.open(request[name], flags | (os.O_CREAT if fd else 0), 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]


if __name__ == "__main__":
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # not the tests' modules
    _import_mailer()
    os.write(int(sys.argv[2]), b"ready\n")
    _become(_serve(int(sys.argv[1]), int(sys.argv[2])))
    from mailer.cli import main

    sys.exit(main())
