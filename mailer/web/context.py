"""What a request handler can reach: the runtime, the queue and the page templates."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates

from mailer.config_values import IPNetwork
from mailer.queue import Queue
from mailer.render import Renderer
from mailer.runtime import Runtime

# The largest id or offset SQL can take (BIGINT, and SQLite's INTEGER): anything larger
# is refused as bad input rather than overflowing in the driver.
MAX_SQL_INT = 2**63 - 1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class AppContext:
    runtime: Runtime
    queue: Queue
    templates: Jinja2Templates
    renderer: Renderer
    _fixed: dict[str, bytes] = field(default_factory=dict)

    def fixed_page(self, name: str, **values: Any) -> bytes:
        """A page that is the same for every request, rendered on first use and kept.

        For answers on the hot path (the sign-up's 202 page): Jinja's render, and its
        check of the template file's mtime, cost more than the rest of the answer. The
        page must not use ``request``, and ``values`` must be the same on every call.
        """
        page = self._fixed.get(name)
        if page is None:
            page = self._fixed[name] = self.templates.get_template(name).render(values).encode()
        return page


def get_ctx(request: Request) -> AppContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, AppContext)
    return ctx


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    ctype = request.headers.get("content-type", "")
    return ctype.startswith("application/json") or (
        "application/json" in accept and "text/html" not in accept
    )


def parse_ip(text: str) -> IPAddress | None:
    """An address as peers and proxies write it: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``,
    ``[2001:db8::1]:443``; IPv4-mapped IPv6 becomes IPv4. None for anything else."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def client_ip(request: Request, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The visitor's address; X-Forwarded-For counts only when the peer is a trusted proxy.

    The header is read from the right: each trusted proxy appends the address it saw,
    so the first untrusted hop is the client. What a client writes further left is
    never believed, and a hop that is not an address ends the walk at the proxy that
    passed it on, so a forged header can neither choose nor rotate the address.
    """
    peer = request.client.host if request.client else "unknown"
    peer_ip = parse_ip(peer)
    if peer_ip is None or not _trusted(peer_ip, trusted_proxies):
        return str(peer_ip) if peer_ip is not None else peer[:64]
    nearest = str(peer_ip)
    chain = ",".join(request.headers.getlist("x-forwarded-for"))
    for hop in reversed([h for h in chain.split(",") if h.strip()]):
        address = parse_ip(hop)
        if address is None:
            return nearest
        if not _trusted(address, trusted_proxies):
            return str(address)
        nearest = str(address)
    return nearest


def rate_limit_key(ip: str) -> str:
    """The unit a per-IP limit counts: one IPv4 address, or one IPv6 /64 (what a single
    subscriber line gets, so rotating addresses inside it gains nothing)."""
    address = parse_ip(ip)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address) if address is not None else ip[:64]
