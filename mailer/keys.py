"""Every Redis key name in one place.

All keys start with the queue name, so one Redis can hold several deployments
(or test runs) side by side without them seeing each other's state.
"""

from __future__ import annotations


class Keys:
    def __init__(self, queue: str) -> None:
        self.queue = queue

    def subscribe_ip(self, ip: str, window: int) -> str:
        return f"{self.queue}:ratelimit:subscribe:{ip}:{window}"

    def confirm_cooldown(self, address_digest: str) -> str:
        """Set while a confirmation mail to one canonical address is recent (a hash, not
        the address: Redis never holds who signed up)."""
        return f"{self.queue}:ratelimit:confirm:address:{address_digest}"

    def confirm_domain(self, domain: str, hour: int) -> str:
        """Confirmation mails from the sign-up form to one recipient domain in one hour."""
        return f"{self.queue}:ratelimit:confirm:domain:{domain}:{hour}"

    @property
    def throttle_global(self) -> str:
        return f"{self.queue}:throttle:global"

    def throttle_domain(self, domain: str) -> str:
        return f"{self.queue}:throttle:domain:{domain}"

    @property
    def throttle_global_reserved(self) -> str:
        """Sorted set of global slots booked ahead of the frontier for domain-limited sends."""
        return f"{self.queue}:throttle:global:reserved"

    @property
    def daily_quota(self) -> str:
        return f"{self.queue}:throttle:daily"

    @property
    def daily_quota_total(self) -> str:
        """Running total of the grants held in ``daily_quota``, kept beside it by Lua."""
        return f"{self.queue}:throttle:daily:total"

    @property
    def sent_log(self) -> str:
        """Hash of epoch second -> messages sent in it: the send rate and the chart (1 h kept)."""
        return f"{self.queue}:stats:sent-per-second"

    @property
    def counters(self) -> str:
        """Hash of process-wide counters summed across every worker."""
        return f"{self.queue}:stats:counters"

    @property
    def blast_counters(self) -> str:
        """Hash of "<blast id>:<outcome>" -> messages, summed across every worker."""
        return f"{self.queue}:stats:blast-counters"

    @property
    def job_counters(self) -> str:
        """Hash of "<task function>:<outcome>" -> jobs ended so, summed across every worker."""
        return f"{self.queue}:stats:jobs"

    @property
    def smtp_latency(self) -> str:
        """Hash of SMTP latency histogram buckets (upper bound -> count, not cumulative), sum."""
        return f"{self.queue}:stats:smtp-latency"

    @property
    def worker_heartbeats(self) -> str:
        """Hash of worker id -> last heartbeat (epoch seconds)."""
        return f"{self.queue}:workers"

    @property
    def worker_jobs(self) -> str:
        """Hash of worker id -> jobs running in that worker now."""
        return f"{self.queue}:workers:jobs"

    def blast_active(self, blast_id: int) -> str:
        """Set (with a TTL) by every batch making progress; the reconciler leaves those be."""
        return f"{self.queue}:blast:{blast_id}:active"

    def blast_idle(self, blast_id: int) -> str:
        """When the reconciler first found this blast idle with work left (epoch seconds)."""
        return f"{self.queue}:blast:{blast_id}:idle-since"

    def admin_session(self, session_digest: str) -> str:
        """One signed-in admin session, by a SHA-256 of its id (mailer/admin_sessions.py)."""
        return f"{self.queue}:admin:session:{session_digest}"

    def admin_editor_sessions(self, editor_id: int) -> str:
        """Set of one editor's session digests, so disabling the editor can end them all."""
        return f"{self.queue}:admin:editor:{editor_id}:sessions"

    def admin_login(self, ip: str, window: int) -> str:
        """Attempts to sign in to /admin from one client address in one window."""
        return f"{self.queue}:ratelimit:admin-login:{ip}:{window}"

    def admin_preview(self, editor_id: int, draft_id: str) -> str:
        """A draft being composed in the admin UI, kept briefly for its preview frame."""
        return f"{self.queue}:admin:preview:{editor_id}:{draft_id}"

    def webhook_token(self, provider: str, token: str) -> str:
        """A provider's one-time webhook token, kept (with a TTL) once used: a replay is refused."""
        return f"{self.queue}:webhooks:{provider}:token:{token}"

    def dev_login(self, token_digest: str) -> str:
        """A one-time admin login link of ``mailer dev`` (the SHA-256 of its token), with a TTL."""
        return f"{self.queue}:dev:login:{token_digest}"

    @property
    def feed_poll_lock(self) -> str:
        """Held while the site's feeds are polled, so two polls never overlap."""
        return f"{self.queue}:feeds:poll-lock"

    # arq's own job keys (arq:job:<id>) are not scoped by queue, so our job ids are.

    def batch_job_id(self, blast_id: int, first_id: int, generation: str = "") -> str:
        suffix = f":{generation}" if generation else ""
        return f"{self.queue}:blast:{blast_id}:batch:{first_id}{suffix}"

    def batch_follow_up_job_id(self, blast_id: int, first_id: int, due_ms: int) -> str:
        """The job that takes a range up again when its first handed-back row is due
        (a retry, a slow domain's excess, the daily quota): one per range and due time."""
        return f"{self.queue}:blast:{blast_id}:batch:{first_id}:due:{due_ms}"

    def start_job_id(self, blast_id: int) -> str:
        return f"{self.queue}:blast:{blast_id}:start"

    def confirm_job_id(self, subscriber_id: int, stamp: int) -> str:
        return f"{self.queue}:confirm:{subscriber_id}:{stamp}"
