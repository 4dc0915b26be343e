"""Settings: the one place for every knob.

Everything is read from ``MAILER_*`` environment variables (or a ``.env`` file) so
that web processes and workers on several machines can share one configuration.
A wrong value stops start-up with one line naming the variable, never a traceback.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
DEV_SECRET = "dev-only-secret-key-do-not-use-in-production"  # noqa: S105


class Env(StrEnum):
    dev = "dev"
    production = "production"


class SmtpSecurity(StrEnum):
    none = "none"
    starttls = "starttls"
    tls = "tls"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=32)
def parse_networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Addresses and CIDR ranges (``10.0.0.0/8``, ``2001:db8::/32``); an address is a
    network of one. Raises ValueError naming the first entry that is neither."""
    out: list[IPNetwork] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or CIDR range (e.g. 10.0.0.1 or 10.0.0.0/8)"
            ) from None
    return tuple(out)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAILER_",
        env_file=".env",
        extra="ignore",
        validate_default=True,
        env_ignore_empty=True,
    )

    env: Env = Env.dev
    database_url: str = "sqlite+aiosqlite:///./mailer.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = Field("mailer", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(1025, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.none
    smtp_ca_file: Path | None = None
    smtp_timeout_s: float = Field(30.0, gt=0)
    smtp_connections: int = Field(10, ge=1, le=200)

    from_address: str = "updates@example.org"
    from_name: str = "Campaign updates"
    list_name: str = "Campaign updates"
    base_url: str = "http://127.0.0.1:8000"

    secret_key: SecretStr | None = None
    old_secret_keys: Annotated[list[SecretStr], NoDecode] = []

    rate_per_second: float = Field(0.0, ge=0)
    rate_burst: int = Field(10, ge=0)
    domain_rates: Annotated[dict[str, float], NoDecode] = {}
    daily_quota: int = Field(0, ge=0)
    daily_window_s: int = Field(86400, ge=1)
    batch_size: int = Field(500, ge=1, le=10000)
    retry_base_s: float = Field(30.0, gt=0)
    retry_max_age_s: int = Field(3 * 86400, ge=0)
    policy_failures_pause: int = Field(10, ge=1)
    reconcile_interval_s: int = Field(10, ge=1, le=60)
    # How long a worker's claim on recipients lasts before another may take them over.
    delivery_lease_s: int = Field(120, ge=1)

    confirm_token_ttl_s: int = Field(7 * 86400, ge=60)
    confirm_resend_s: int = Field(3600, ge=0)
    subscribe_limit_per_minute: int = Field(10, ge=1)
    trusted_proxies: Annotated[list[str], NoDecode] = []

    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_key_file: Path | None = None
    feedback_id: str | None = None
    verp_domain: str | None = None

    # Bounces and complaints (docs/bounces.md).
    soft_bounce_limit: int = Field(3, ge=1, le=1000)
    soft_bounce_window_days: int = Field(14, ge=1, le=3650)
    bounce_pause_rate: float = Field(0.05, gt=0, le=1)
    complaint_pause_rate: float = Field(0.003, gt=0, le=1)
    # Neither rate pauses a blast before this many of its messages were sent: over a few
    # dozen messages one bounce or one complaint is noise, not a rate.
    bounce_pause_min_sent: int = Field(500, ge=1)

    log_format: LogFormat = LogFormat.text
    templates_dir: Path = ROOT / "templates"
    dev_inbox_dir: Path = Path(".dev/inbox")
    max_body_bytes: int = Field(1_000_000, ge=1024)

    @field_validator("old_secret_keys", "trusted_proxies", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        parse_networks(tuple(value))  # a typo must stop start-up, not trust nobody silently
        return value

    @field_validator("domain_rates", mode="before")
    @classmethod
    def _domain_rates(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        rates: dict[str, float] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            domain, sep, rate = item.partition("=")
            if not sep or not domain.strip():
                raise ValueError(f"expected domain=rate pairs, got {item!r}")
            rates[domain.strip().lower()] = float(rate)
        return rates

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL")
        return value.rstrip("/")

    @field_validator("verp_domain")
    @classmethod
    def _verp_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower().rstrip(".")
        if not _DOMAIN.fullmatch(value):
            raise ValueError("must be a domain name like bounces.example.org")
        return value

    @field_validator("from_address")
    @classmethod
    def _from_address(cls, value: str) -> str:
        if "@" not in value or any(c in value for c in "\r\n <>"):
            raise ValueError("must be a plain address like updates@example.org")
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.env is Env.production:
            if self.secret_key is None or len(self.secret_key.get_secret_value()) < 16:
                raise ValueError("MAILER_SECRET_KEY: required outside dev (at least 16 characters)")
            if not self.base_url.startswith("https://"):
                raise ValueError(
                    "MAILER_BASE_URL: must be https in production (RFC 8058 one-click)"
                )
        return self

    # Derived values -----------------------------------------------------

    @property
    def signing_keys(self) -> list[str]:
        """Old keys first, current key last: itsdangerous signs with the last one."""
        current = self.secret_key.get_secret_value() if self.secret_key else DEV_SECRET
        return [k.get_secret_value() for k in self.old_secret_keys] + [current]

    @property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        """``trusted_proxies`` parsed (cached per value, so copies of Settings stay right)."""
        return parse_networks(tuple(self.trusted_proxies))

    @property
    def public_host(self) -> str:
        return urlsplit(self.base_url).hostname or "localhost"

    @property
    def list_id(self) -> str:
        return f"updates.{self.public_host}"

    @property
    def sender_domain(self) -> str:
        return self.from_address.rpartition("@")[2]


class SettingsError(SystemExit):
    """A configuration problem, reported in one line."""


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return f"MAILER_{loc[0].upper()}: {msg}"
    return msg


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning a validation error into a one-line SystemExit."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(f"configuration error: {_describe(exc)}") from None


@functools.cache
def get_settings() -> Settings:
    return load_settings()
