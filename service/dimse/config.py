"""Parsing the node's ``FUNDUS_DIMSE_*`` values that are more than a number: the destination and the peers.

Kept apart from :class:`service.settings.Settings` (which stores them as plain strings, like every other
setting) so that a bad value fails ``fundus dicom-node`` at start with one clear line rather than every
``fundus`` command that happens to read the environment.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars


class DimseConfigError(ValueError):
    """A ``FUNDUS_DIMSE_*`` value cannot be used (the message names the setting, never a secret)."""


@dataclass(frozen=True)
class Destination:
    """The Storage SCP derived instances are sent to (``AE@host:port``)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def check_ae_title(value: str, setting: str) -> str:
    """``value`` stripped, if it is a valid AE title (1–16 characters, no backslash or control chars)."""
    title = value.strip()
    if not _AE_TITLE.match(title):
        raise DimseConfigError(f"{setting}: {value!r} is not a valid AE title (1-16 printable characters)")
    return title


def parse_destination(value: str | None) -> Destination:
    """``AE@host:port`` (IPv6 hosts in brackets: ``PACS@[fd00::5]:104``) → :class:`Destination`.

    Raises:
        DimseConfigError: missing or malformed.
    """
    setting = "FUNDUS_DIMSE_DESTINATION"
    if not value or not value.strip():
        raise DimseConfigError(f"{setting} is required: the PACS to send results to, as AE@host:port")
    ae_part, at, address = value.strip().rpartition("@")
    if not at:
        raise DimseConfigError(f"{setting}: expected AE@host:port, got {value!r}")
    ae_title = check_ae_title(ae_part, setting)
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not bracket:
            raise DimseConfigError(f"{setting}: unclosed '[' in {value!r}")
    else:
        host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DimseConfigError(f"{setting}: expected AE@host:port with a port 1-65535, got {value!r}")
    return Destination(ae_title=ae_title, host=host, port=int(port_text))


def parse_ae_titles(value: str) -> list[str]:
    """``FUNDUS_DIMSE_ALLOWED_AE_TITLES``: comma-separated titles; empty → [] (any title)."""
    return [
        check_ae_title(part, "FUNDUS_DIMSE_ALLOWED_AE_TITLES") for part in value.split(",") if part.strip()
    ]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str) -> list[Network]:
    """``FUNDUS_DIMSE_ALLOWED_HOSTS``: comma-separated addresses or CIDR networks; empty → [] (any peer).

    Host names are refused on purpose: an allow-list that depends on DNS answers at connect time can be
    steered by whoever controls DNS.
    """
    networks: list[Network] = []
    for part in value.split(","):
        text = part.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise DimseConfigError(
                f"FUNDUS_DIMSE_ALLOWED_HOSTS: {text!r} is not an IP address or network (CIDR)"
            ) from None
    return networks


def host_allowed(address: str, networks: list[Network]) -> bool:
    """Whether a peer's IP address is inside one of ``networks`` (always True for an empty list)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return any(ip in network for network in networks if network.version == ip.version)
