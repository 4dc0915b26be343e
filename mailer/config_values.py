"""How a setting's text becomes a value: addresses and ranges, origins, domains, keys.

Kept apart from ``config.py`` so the settings class reads as a list of knobs; every
function here raises ValueError with a message a person can act on (the settings
loader puts the variable's name in front of it).
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import re
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN = re.compile(rf"{LABEL}(?:\.{LABEL})+")

TOPIC_ARN = re.compile(r"arn:aws(?:-[a-z]+)*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}")


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


def is_loopback(host: str) -> bool:
    """The relay is on this machine: credentials in clear never cross a network."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ec_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """A P-256 public key as SendGrid shows it: base64 of the DER SubjectPublicKeyInfo
    (a PEM block is accepted too). Raises ValueError saying what is wrong."""
    body = "".join(line for line in text.strip().splitlines() if not line.startswith("-----"))
    try:
        key = serialization.load_der_public_key(base64.b64decode(body, validate=True))
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise ValueError("must be the base64 public key SendGrid shows (DER)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("must be an ECDSA P-256 public key")
    return key


def web_origin(url: str) -> str | None:
    """``scheme://host[:port]`` as browsers write the Origin header (lower case, default
    port left out), or None when ``url`` is not an absolute http(s) URL."""
    if any(ch.isspace() or ch == "\\" or ord(ch) < 0x20 for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value
