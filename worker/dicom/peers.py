"""Parsing the DICOM peers named in settings: ``AE@host:port`` destinations and the allowed
callers (``AE`` or ``AE@host``). Pure, so the rules are tested without a network."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from db.exceptions import CxrError


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Caller:
    ae_title: str
    host: str | None = None


def _ae_title(text: str, where: str) -> str:
    title = text.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        raise CxrError(f"{where}: {text!r} is not a DICOM AE title (1 to 16 characters)")
    return title


def parse_destination(text: str, where: str = "CXR_DICOM_DESTINATIONS") -> Destination:
    """``AE@host:port`` (an IPv6 host in brackets: ``AE@[::1]:104``)."""
    title, at, rest = text.strip().rpartition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CxrError(f"{where}: {text.strip()!r} is not AE@host:port")
    return Destination(_ae_title(title, where), host.strip("[]"), int(port))


def parse_destinations(text: str) -> list[Destination]:
    return [parse_destination(part) for part in text.split(",") if part.strip()]


def parse_callers(text: str) -> list[Caller]:
    """``CXR_DICOM_ALLOWED``: ``AE`` or ``AE@host`` entries, comma separated."""
    callers = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            title, _, host = part.partition("@")
            callers.append(Caller(_ae_title(title, "CXR_DICOM_ALLOWED"), host.strip() or None))
    return callers


def is_loopback(host: str) -> bool:
    """True for a loopback address or a name that resolves only to loopback ones."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _same_host(allowed: str, address: str) -> bool:
    if allowed == address:
        return True
    try:
        return any(i[4][0] == address for i in socket.getaddrinfo(allowed, None))
    except OSError:
        return False


def caller_allowed(callers: list[Caller], ae_title: str, address: str) -> bool:
    """May the peer at ``address`` calling itself ``ae_title`` send? An empty list allows
    loopback peers only."""
    if not callers:
        return is_loopback(address)
    title = ae_title.strip()
    return any(c.ae_title == title and (c.host is None or _same_host(c.host, address))
               for c in callers)
