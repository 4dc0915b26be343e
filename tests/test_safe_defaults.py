"""Safe by default: without configuration nothing runs with a known key (docs/security.md).

Every command but `mailer dev` is production unless told otherwise, needs its own secret
key of 32+ characters, and refuses the development key printed in the source, also as an
old key. tests/test_dev_command.py shows `mailer dev` still starts with no configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from smtpserver import free_port

from mailer.config import DEV_SECRET, SettingsError, load_dev_settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
MAILER = str(Path(sys.executable).parent / "mailer")
GOOD_KEY = "a-key-of-our-own-0123456789abcdef-xyz"


def scrubbed(**extra: str) -> dict[str, str]:
    """The test process's environment without a single MAILER_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return env | extra


def run_briefly(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    """Run a command that must stop by itself; a server that starts instead is killed."""
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{args} kept running without configuration") from None
    return proc.returncode, err.decode(), time.monotonic() - started


def test_serve_with_no_configuration_at_all_exits_naming_the_secret_key(tmp_path: Path) -> None:
    args = [MAILER, "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    code, err, took = run_briefly(args, scrubbed(), tmp_path)  # tmp_path: no .env file there
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "MAILER_SECRET_KEY" in lines[0], err
    assert "Traceback" not in err
    assert took < 15, f"took {took:.1f} s"


@pytest.mark.parametrize(
    "args",
    [
        ["worker"],
        ["migrate"],
        ["status"],
        ["editors", "add", "Ada"],
        ["send-test", "ops@example.com"],
        ["subscribers", "export"],
    ],
)
def test_every_other_command_needs_a_key_of_its_own(args: list[str], tmp_path: Path) -> None:
    code, err, _ = run_briefly([MAILER, *args], scrubbed(), tmp_path)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "MAILER_SECRET_KEY" in lines[0], (args, err)
    assert not list(tmp_path.iterdir()), "nothing may be written (no SQLite file)"


def test_the_arq_entry_point_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    """`arq worker.WorkerSettings` (and the compose healthcheck) import the root worker.py."""
    env = scrubbed(PYTHONPATH=str(ROOT))
    code, err, _ = run_briefly([sys.executable, "-c", "import worker"], env, tmp_path)
    assert code != 0 and "MAILER_SECRET_KEY" in err


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        # The development key, even with dev mode asked for by hand.
        ({"MAILER_ENV": "dev", "MAILER_SECRET_KEY": DEV_SECRET}, "MAILER_SECRET_KEY"),
        ({"MAILER_SECRET_KEY": DEV_SECRET}, "MAILER_SECRET_KEY"),
        # ... or hidden among the old keys.
        (
            {
                "MAILER_ENV": "dev",
                "MAILER_SECRET_KEY": GOOD_KEY,
                "MAILER_OLD_SECRET_KEYS": DEV_SECRET,
            },
            "MAILER_OLD_SECRET_KEYS",
        ),
        # Too short to be a secret.
        ({"MAILER_ENV": "dev", "MAILER_SECRET_KEY": "x" * 31}, "MAILER_SECRET_KEY"),
    ],
)
def test_known_or_weak_keys_are_refused(extra: dict[str, str], named: str, tmp_path: Path) -> None:
    env = scrubbed(MAILER_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}") | extra
    code, err, _ = run_briefly([MAILER, "migrate"], env, tmp_path)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], err
    assert not (tmp_path / "m.db").exists()


def test_a_key_of_32_characters_and_https_is_enough(tmp_path: Path) -> None:
    env = scrubbed(
        MAILER_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
        MAILER_SECRET_KEY="k" * 32,
        MAILER_BASE_URL="https://updates.example.org",
    )
    code, err, _ = run_briefly([MAILER, "migrate"], env, tmp_path)
    assert code == 0, err


def test_settings_default_to_production(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("MAILER_"):
            monkeypatch.delenv(key)
    with pytest.raises(SettingsError, match="MAILER_SECRET_KEY: required"):
        load_settings()
    with pytest.raises(SettingsError, match="MAILER_BASE_URL: must be https"):
        load_settings(secret_key=GOOD_KEY)
    assert load_settings(secret_key=GOOD_KEY, base_url="https://u.example.org").env == "production"
    # `mailer dev` alone switches dev mode on, and only it signs with the built-in key.
    dev = load_dev_settings()
    assert dev.env == "dev" and dev.signing_keys == [DEV_SECRET]
    monkeypatch.setenv("MAILER_ENV", "production")
    monkeypatch.setenv("MAILER_SECRET_KEY", GOOD_KEY)
    dev = load_dev_settings()
    assert dev.env == "dev" and dev.signing_keys == [GOOD_KEY]  # a configured key wins


def test_old_keys_keep_the_previous_minimum_so_rotation_keeps_old_links() -> None:
    settings = load_settings(
        secret_key=GOOD_KEY, old_secret_keys="sixteen-chars-ok", base_url="https://u.example.org"
    )
    assert settings.signing_keys == ["sixteen-chars-ok", GOOD_KEY]
    with pytest.raises(SettingsError, match="MAILER_OLD_SECRET_KEYS"):
        load_settings(
            secret_key=GOOD_KEY, old_secret_keys="short", base_url="https://u.example.org"
        )


@pytest.mark.parametrize(
    ("host", "security", "refused"),
    [
        ("smtp.relay.example", "none", True),
        ("203.0.113.5", "none", True),
        ("smtp.relay.example", "starttls", False),
        ("smtp.relay.example", "tls", False),
        ("127.0.0.1", "none", False),  # a relay on this machine: nothing crosses a network
        ("localhost", "none", False),
        ("::1", "none", False),
    ],
)
def test_no_smtp_credentials_in_clear_in_production(
    host: str, security: str, refused: bool
) -> None:
    values = {
        "secret_key": GOOD_KEY,
        "base_url": "https://u.example.org",
        "smtp_host": host,
        "smtp_security": security,
    }
    for auth in ({"smtp_username": "user"}, {"smtp_password": "pw"}):
        if refused:
            with pytest.raises(SettingsError, match="MAILER_SMTP_SECURITY"):
                load_settings(**values, **auth)
        else:
            load_settings(**values, **auth)
        load_settings(**values, env="dev", **auth)  # dev mode (mailer dev) may
    load_settings(**values)  # no credentials, nothing to leak
