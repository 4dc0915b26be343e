"""Settings: the one place for every knob.

Everything is read from ``MAILER_*`` environment variables (or a ``.env`` file, or the
file MAILER_ENV_FILE names) so web processes and workers on several machines share one.
A wrong value stops start-up with one line naming the variable, never a traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mailer.config_values import (
    DOMAIN,
    TOPIC_ARN,
    IPNetwork,
    ec_public_key,
    is_loopback,
    parse_networks,
    split_csv,
    web_origin,
)
from mailer.errors import one_line

ROOT = Path(__file__).resolve().parent.parent
# The key `mailer dev` signs with when none is configured. It is printed in the source, so
# every other command refuses it (``refuse_dev_key``), wherever it appears (docs/security.md).
DEV_SECRET = "dev-only-secret-key-do-not-use-in-production"  # noqa: S105
MIN_SECRET_KEY_CHARS = 32
# Keys still listed in MAILER_OLD_SECRET_KEYS only verify links already mailed; the old
# minimum of 16 stays for them so a key rotation never breaks those links (docs/security.md).
MIN_OLD_SECRET_KEY_CHARS = 16
GENERATE_KEY_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


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


class FeedMode(StrEnum):
    hold = "hold"  # a new statement from the site waits as a draft for an editor
    blast = "blast"  # a new statement from the site is sent at once


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAILER_",
        env_file=os.environ.get("MAILER_ENV_FILE", ".env"),
        extra="ignore",
        validate_default=True,
        env_ignore_empty=True,
    )

    # Production unless `mailer dev` says otherwise: no configuration must never mean a
    # known key or relaxed checks (docs/security.md).
    env: Env = Env.production
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

    # Optional bearer token for /metrics; open when unset (docs/deploy.md).
    metrics_token: SecretStr | None = None
    # Confirmation mails per recipient domain per hour from the sign-up form; 0 = no cap.
    confirm_domain_limit_per_hour: int = Field(100, ge=0)

    # Bounces and complaints (docs/bounces.md).
    soft_bounce_limit: int = Field(3, ge=1, le=1000)
    soft_bounce_window_days: int = Field(14, ge=1, le=3650)
    bounce_pause_rate: float = Field(0.05, gt=0, le=1)
    complaint_pause_rate: float = Field(0.003, gt=0, le=1)
    # Neither rate pauses a blast before this many of its messages were sent: over a few
    # dozen messages one bounce or one complaint is noise, not a rate.
    bounce_pause_min_sent: int = Field(500, ge=1)

    # Provider webhooks (docs/deploy.md, "Provider webhooks"); each is off until configured.
    ses_topic_arns: Annotated[list[str], NoDecode] = []
    postmark_webhook_user: str | None = None
    postmark_webhook_password: SecretStr | None = None
    sendgrid_webhook_public_key: str | None = None
    mailgun_signing_key: SecretStr | None = None
    # A signed webhook older (or further in the future) than this is refused as a replay.
    webhook_max_age_s: int = Field(600, ge=30, le=86400)

    log_format: LogFormat = LogFormat.text
    templates_dir: Path = ROOT / "templates"
    dev_inbox_dir: Path = Path(".dev/inbox")
    max_body_bytes: int = Field(1_000_000, ge=1024)

    # The campaign site: its feeds, and the origins whose pages may post the sign-up form.
    feed_urls: Annotated[list[str], NoDecode] = []
    feed_poll_s: int = Field(300, ge=1)
    feed_mode: FeedMode = FeedMode.hold
    feed_timeout_s: float = Field(20.0, gt=0, le=300)
    feed_max_bytes: int = Field(5_000_000, ge=10_000)
    allowed_origins: Annotated[list[str], NoDecode] = []

    @field_validator(
        "old_secret_keys",
        "trusted_proxies",
        "ses_topic_arns",
        "feed_urls",
        "allowed_origins",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        parse_networks(tuple(value))  # a typo must stop start-up, not trust nobody silently
        return value

    @field_validator("feed_urls")
    @classmethod
    def _feed_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if web_origin(url) is None or len(url) > 2000:
                raise ValueError(f"{url!r} is not an absolute http(s) URL")
        return list(dict.fromkeys(value))

    @field_validator("allowed_origins")
    @classmethod
    def _allowed_origins(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for entry in value:
            origin = web_origin(entry)
            parts = urlsplit(entry) if origin else None
            if parts is None or parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(
                    f"{entry!r} is not an origin like https://www.example.org or "
                    "http://localhost:8080 (scheme://host[:port], no path)"
                )
            out.append(str(origin))
        return list(dict.fromkeys(out))

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

    @field_validator("ses_topic_arns")
    @classmethod
    def _ses_topic_arns(cls, value: list[str]) -> list[str]:
        for arn in value:
            if not TOPIC_ARN.fullmatch(arn):
                raise ValueError(
                    f"{arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:TOPIC)"
                )
        return value

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        ec_public_key(value)  # a key that cannot verify anything must stop start-up
        return value.strip()

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
        if not DOMAIN.fullmatch(value):
            raise ValueError("must be a domain name like bounces.example.org")
        return value

    @field_validator("from_address")
    @classmethod
    def _from_address(cls, value: str) -> str:
        if "@" not in value or any(c in value for c in "\r\n <>"):
            raise ValueError("must be a plain address like updates@example.org")
        return value

    @model_validator(mode="after")
    def _key_rules(self) -> Settings:
        """Checked first, so an unconfigured install fails naming the one thing it needs."""
        if self.secret_key is None:
            raise ValueError(
                f"MAILER_SECRET_KEY: required ({MIN_SECRET_KEY_CHARS}+ random characters; "
                f"generate one with {GENERATE_KEY_HINT})"
            )
        key = self.secret_key.get_secret_value()
        if key == DEV_SECRET and self.env is not Env.dev:
            raise ValueError(
                "MAILER_SECRET_KEY: the built-in development key is published in the source; "
                f"set your own (generate one with {GENERATE_KEY_HINT})")  # fmt: skip
        if len(key) < MIN_SECRET_KEY_CHARS:
            raise ValueError(
                f"MAILER_SECRET_KEY: must be at least {MIN_SECRET_KEY_CHARS} characters "
                f"(generate one with {GENERATE_KEY_HINT})"
            )
        for old in self.old_secret_keys:
            value = old.get_secret_value()
            if value == DEV_SECRET:
                raise ValueError(
                    "MAILER_OLD_SECRET_KEYS: holds the built-in development key, which anyone "
                    "can read in the source; remove it"
                )
            if len(value) < MIN_OLD_SECRET_KEY_CHARS:
                raise ValueError(
                    f"MAILER_OLD_SECRET_KEYS: every key must be at least "
                    f"{MIN_OLD_SECRET_KEY_CHARS} characters"
                )
        return self

    @model_validator(mode="after")
    def _postmark_pair(self) -> Settings:
        if (self.postmark_webhook_user is None) != (self.postmark_webhook_password is None):
            raise ValueError(
                "MAILER_POSTMARK_WEBHOOK_USER and MAILER_POSTMARK_WEBHOOK_PASSWORD: "
                "set both or neither"
            )
        if self.postmark_webhook_user is not None and ":" in self.postmark_webhook_user:
            raise ValueError("MAILER_POSTMARK_WEBHOOK_USER: must not contain ':' (basic auth)")
        if self.postmark_webhook_password is not None:
            if len(self.postmark_webhook_password.get_secret_value()) < 16:
                raise ValueError("MAILER_POSTMARK_WEBHOOK_PASSWORD: at least 16 characters")
        return self

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.env is Env.production:
            if not self.base_url.startswith("https://"):
                raise ValueError(
                    "MAILER_BASE_URL: must be https in production (RFC 8058 one-click)"
                )
            if (
                self.smtp_security is SmtpSecurity.none
                and (self.smtp_username or self.smtp_password)
                and not is_loopback(self.smtp_host)
            ):
                raise ValueError(
                    "MAILER_SMTP_SECURITY: none would send MAILER_SMTP_USERNAME/PASSWORD in "
                    "clear text to a relay on the network; use starttls or tls"
                )
        return self

    # Derived values -----------------------------------------------------

    @property
    def signing_keys(self) -> list[str]:
        """Old keys first, current key last: itsdangerous signs with the last one."""
        assert self.secret_key is not None  # required by _key_rules
        current = self.secret_key.get_secret_value()
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


def _variable(loc: Sequence[str]) -> str:
    """The environment variable a settings error is about ("" for the model as a whole)."""
    fields = [part for part in loc if part != "__root__"]
    return f"MAILER_{fields[0].upper()}" if fields else ""


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning a validation error into a one-line SystemExit."""
    return load_settings_of(Settings, **overrides)


def load_settings_of(cls: type[Settings], **overrides: object) -> Settings:
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(
            f"configuration error: {one_line(exc, first=True, where=_variable)}"
        ) from None


def refuse_dev_key(settings: Settings) -> Settings:
    """Every entry point but `mailer dev` goes through this: the published key never signs.

    Settings alone accept the built-in key with ``env=dev`` (that is how `mailer dev`
    runs); ``MAILER_ENV=dev mailer serve`` must still not sign with it.
    """
    if DEV_SECRET in settings.signing_keys:
        raise SettingsError(
            "configuration error: MAILER_SECRET_KEY: the built-in development key works only "
            f"under `mailer dev`; set your own (generate one with {GENERATE_KEY_HINT})"
        )
    return settings


class _DevSettings(Settings):
    """Settings whose *default* key is the built-in one: a configured key still wins."""

    secret_key: SecretStr | None = SecretStr(DEV_SECRET)


def load_dev_settings() -> Settings:
    """`mailer dev` only: dev mode whatever MAILER_ENV says, and the dev key if none is set."""
    return load_settings_of(_DevSettings, env=Env.dev)


@functools.cache
def get_settings() -> Settings:
    """The settings of a long-running process (the arq entry point): never the dev key."""
    return refuse_dev_key(load_settings())
