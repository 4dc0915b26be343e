"""A pytest plugin: one test's failure must never change another test's fixtures.

Two parts, registered under their own names so a test can switch one off
(``-p no:contain-teardown``) and watch the other catch what follows:

``contain-teardown``
    pytest tears a test down in ``SetupState.teardown_exact``, which catches
    ``Exception`` only. A finalizer that raises any other ``BaseException`` (an
    ``asyncio.CancelledError`` out of an async fixture, say) leaves that loop at once:
    the finalizers queued after it never run, so those fixtures keep their cached value.
    A function-scoped fixture without parameters has the same cache key (``None``) in
    every test, so the *next* test is handed the previous test's SMTP server, tmp_path,
    database and queue. This wraps every pending finalizer just before teardown so such
    an exception becomes an ordinary ``Exception``: pytest reports it once, at the
    teardown of the test that raised it, and runs every other finalizer. Only
    ``KeyboardInterrupt``, ``SystemExit`` and pytest's own outcomes pass unchanged.
    See docs/testing.md.

``fixture-guard``
    After each test's setup: every function-scoped fixture it uses must have been set
    up for this test (not handed over from an earlier one), and no database URL,
    tmp_path, queue name or SMTP server may have been given to another test of this
    session. A breach fails the test's setup, naming the fixture and the first owner.

``MAILER_TEST_FAIL_TEARDOWN=<part of a test id>`` makes the teardown of the matching
tests raise ``asyncio.CancelledError``, as arq's ``Worker.close()`` once did: a way to
show by hand, on the whole suite, that such a failure is reported once and harms no
other test (tests/test_isolation.py checks the same on an inner session).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from _pytest.outcomes import OutcomeException

PASS_THROUGH = (Exception, OutcomeException, KeyboardInterrupt, SystemExit)
FAIL_TEARDOWN_ENV = "MAILER_TEST_FAIL_TEARDOWN"


class TeardownInterrupted(Exception):  # noqa: N818 - it says what happened
    """A finalizer raised a BaseException that would have cut the teardown short."""


def _contained(fin: Callable[[], object]) -> Callable[[], object]:
    if getattr(fin, "_mailer_contained", False):
        return fin

    @functools.wraps(fin)
    def run() -> object:
        try:
            return fin()
        except PASS_THROUGH:
            raise
        except BaseException as exc:
            raise TeardownInterrupted(
                f"a fixture teardown raised {type(exc).__name__}: {exc!r} "
                "(turned into an Exception so the other fixtures are still torn down)"
            ) from exc

    run._mailer_contained = True  # type: ignore[attr-defined]
    return run


class ContainTeardown:
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        # SetupState.stack: {node: (finalizers, setup exception)}; its shape is checked so
        # that a pytest upgrade that changes it fails here, loudly, rather than silently.
        stack = item.session._setupstate.stack
        assert isinstance(stack, dict), "pytest's SetupState changed: see tests/isolation.py"
        for finalizers, _ in stack.values():
            finalizers[:] = [_contained(fin) for fin in finalizers]
        return (yield)


class FixtureGuard:
    # Values that must be unique to one test in a session, by what they are named.
    IDENTITIES = ("db_url", "tmp_path", "settings", "smtp")

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}  # identity -> node id of the test it was handed to
        self.fresh: set[int] = set()  # FixtureDefs set up during the current test's setup
        self.servers: list[Any] = []  # every SMTP server seen, kept alive so ids stay unique

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        self.fresh.add(id(fixturedef))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        self.fresh = set()
        result = yield  # raises (and skips the checks) when the setup itself failed
        assert isinstance(item, pytest.Function)
        stale = [
            name
            for name in item.fixturenames
            if name != "request"
            and (defs := item._fixtureinfo.name2fixturedefs.get(name))
            and defs[-1].scope == "function"
            and id(defs[-1]) not in self.fresh
        ]
        if stale:
            pytest.fail(
                f"isolation breach: {item.nodeid} was handed function-scoped fixtures that "
                f"were not set up for it (left over from an earlier test): {stale}",
                pytrace=False,
            )
        for name, identity in self._identities(item.funcargs):
            first = self.owner.setdefault(identity, item.nodeid)
            if first != item.nodeid:
                pytest.fail(
                    f"isolation breach: {item.nodeid} got {name} {identity!r}, "
                    f"which was already handed to {first}",
                    pytrace=False,
                )
        return result

    def _identities(self, funcargs: dict[str, Any]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name in self.IDENTITIES:
            if name not in funcargs:
                continue
            value = funcargs[name]
            if name == "settings":
                out.append(("the queue name", f"queue:{value.queue_name}"))
                out.append(("the database", f"db:{value.database_url}"))
            elif name == "smtp":
                out.append(("the SMTP server", f"smtp:{id(value)}:{value.port}"))
                self.servers.append(value)
            elif name == "db_url":
                out.append(("the database", f"db:{value}"))
            elif isinstance(value, Path):
                out.append(("tmp_path", f"path:{value}"))
        return out


def _fail_teardown() -> None:
    raise asyncio.CancelledError(f"{FAIL_TEARDOWN_ENV}: a teardown cut short on purpose")


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    pattern = os.environ.get(FAIL_TEARDOWN_ENV)
    if pattern and pattern in item.nodeid:
        # Registered last, so it runs first at teardown: before any fixture is finished.
        item.addfinalizer(_fail_teardown)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ContainTeardown(), "contain-teardown")
    config.pluginmanager.register(FixtureGuard(), "fixture-guard")
