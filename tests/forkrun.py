"""`mailer` processes for tests, forked from a process that has imported mailer.

Starting `mailer` costs about a second of CPU on this kind of machine, nearly all of it
importing SQLAlchemy, pydantic, redis and typer, and tests start many: short commands
(`mailer editors add`, `mailer subscribers import`, ...) and about thirty `mailer worker`
processes (two at once for the rate ceiling, four in a row for the SIGKILL test). The
eight test files that run most commands took 194 core-seconds with a fresh process per
command and 135 with this (docs/testing.md). Here a fork server per pytest process
imports every module of mailer once; each process is then a fresh ``fork`` of it: a real
process with its own pid, argv, environment, working directory, stdin, stdout, stderr and
exit status, running ``mailer.cli.main`` as the console script does, stopped by real
signals, and exiting through the interpreter's normal shutdown (atexit handlers, stream
flushes). Only the imports are shared.

- ``run_mailer``: a command run to its end, like ``subprocess.run``.
- ``spawn_mailer``: a long-lived process (``mailer worker``), like ``subprocess.Popen``:
  ``pid``, ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``.

What this cannot show, and where it is shown instead:
- The console script and interpreter start-up: the tests of `mailer dev`, `mailer serve`,
  the bounce command run as an MTA runs it, and the full run whose logs are searched for
  secrets (test_abuse) exec ``.venv/bin/mailer``.
- Module-level reads of the environment see the pytest process's environment (which
  conftest has already cleaned of ``MAILER_*``). Mailer has one: the name of the env file
  (``MAILER_ENV_FILE``, config.py), which conftest sets to /dev/null for every test.

The server is single-threaded and imports nothing that starts a thread, so forking it
is safe. It never blocks on a child: it answers each request with the new pid at once
and reports every exit as it reaps it, so any number of processes run side by side.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()  # one server per pytest process, started once
_server: _ForkServer | None = None


class _ForkServer:
    """The pytest side: requests down one pipe, ``forked PID`` / ``exited PID CODE`` up
    the other. Any thread may wait for any pid: one reads the pipe and files every line
    it sees, the others wait until it has."""

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
        self._filed = threading.Condition()  # guards what follows, and who reads the pipe
        self._reading = False
        self._spawning = threading.Lock()  # a request and its ``forked`` line go together
        self._forked: list[int] = []
        self._exits: dict[int, int] = {}
        self._ready = False
        deadline = time.monotonic() + 120
        while not self._ready:
            if time.monotonic() > deadline:
                raise RuntimeError("the mailer fork server did not start")
            self._pump(1.0)

    def _pump(self, timeout: float) -> None:
        """Read what the server sends within ``timeout`` and file it. One thread reads at
        a time; the others wait for it to file what it read (or for ``timeout``)."""
        with self._filed:
            if self._reading:
                self._filed.wait(timeout)
                return
            self._reading = True
        chunk = None
        try:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if ready:
                chunk = os.read(self._replies, 65536)
        finally:
            with self._filed:
                self._reading = False
                if chunk:
                    self._file(chunk)
                self._filed.notify_all()
        if chunk == b"":
            raise RuntimeError(f"the mailer fork server exited ({self.proc.poll()})")

    def _file(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            kind, *values = line.decode().split()
            if kind == "ready":
                self._ready = True
            elif kind == "forked":
                self._forked.append(int(values[0]))
            elif kind == "exited":
                self._exits[int(values[0])] = int(values[1])

    def spawn(self, request: dict[str, Any]) -> int:
        with self._spawning:
            os.write(self._requests, json.dumps(request).encode() + b"\n")
            deadline = time.monotonic() + 60
            while not self._forked:
                if time.monotonic() > deadline:
                    raise RuntimeError("the mailer fork server did not fork")
                self._pump(0.5)
            return self._forked.pop(0)

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The pid's exit status (as ``Popen.returncode``), or None if it still runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._exits:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            self._pump(max(left, 0))  # at least one look at the pipe, even for poll()
            if left <= 0 and pid not in self._exits:
                return None
        return self._exits[pid]

    def stop(self) -> None:
        """Close the request pipe: the server kills what still runs and exits."""
        os.close(self._requests)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._replies)


def _fork_server() -> _ForkServer:
    global _server
    with _lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _ForkServer()
        return _server


class MailerProcess:
    """A forked `mailer` process, with the part of ``subprocess.Popen`` tests use."""

    def __init__(self, args: list[str], server: _ForkServer, pid: int) -> None:
        self.args = args
        self.pid = pid
        self._server = server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(["mailer", *self.args], timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """As Popen: never signal a pid that may be reused, and one that has just exited
        (its report not yet read) is no error."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _spawn(
    args: list[str], env: dict[str, str], cwd: str | Path | None, **io: Any
) -> MailerProcess:
    """Fork `mailer ARGS`; ``io`` names the files for stdin, stdout and stderr."""
    server = _fork_server()
    request = {"argv": ["mailer", *args], "env": env, "cwd": str(cwd or os.getcwd()), **io}
    return MailerProcess(args, server, server.spawn(request))


def spawn_mailer(
    args: list[str], *, env: dict[str, str], output: str | Path, append: bool = False
) -> MailerProcess:
    """Like ``subprocess.Popen([MAILER, *args], stdout=out, stderr=out)`` with ``out`` the
    file ``output`` (appended to if ``append``), and stdin from /dev/null; forked."""
    out = str(output)
    return _spawn(args, env, None, stdin=os.devnull, stdout=out, stderr=out, append=append)


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
    with tempfile.TemporaryDirectory(prefix="mailer-run-") as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
        data = input.encode() if isinstance(input, str) else (input or b"")
        Path(files["stdin"]).write_bytes(data)
        proc = _spawn(args, env, cwd, **files)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)
            raise
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
    """Fork once per request and report each child's exit as it is reaped; return the
    request in the child, never in the server. SIGCHLD wakes the ``select`` through a
    wakeup pipe."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()
    buffer = b""
    os.write(replies, b"ready\n")
    while True:
        ready, _, _ = select.select([requests, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                children.discard(pid)
                os.write(replies, f"exited {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
        if requests not in ready:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:  # the pytest process is done with us: leave no process behind
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            os._exit(0)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            request: dict[str, Any] = json.loads(line)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (requests, replies, wake_r, wake_w):
                    os.close(fd)
                return request
            children.add(pid)
            os.write(replies, f"forked {pid}\n".encode())


def _become(request: dict[str, Any]) -> None:
    """Turn this forked child into `mailer ARGS` with the request's streams and env."""
    keep = os.O_APPEND if request.get("append") else os.O_TRUNC
    for fd, name, flags in (
        (0, "stdin", os.O_RDONLY),
        (1, "stdout", os.O_WRONLY | keep),
        (2, "stderr", os.O_WRONLY | keep),
    ):
        if fd == 2 and request["stderr"] == request["stdout"]:
            os.dup2(1, 2)  # one open file, as Popen(stdout=out, stderr=out): one offset
            continue
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
    # What the imports made lives as long as any child: out of the collector's sight, no
    # collection in a child walks it, or writes to (and so copies) the pages it is on.
    gc.freeze()
    _become(_serve(int(sys.argv[1]), int(sys.argv[2])))
    from mailer.cli import main

    sys.exit(main())
