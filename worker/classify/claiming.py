"""The claim protocol: which delivery classifies an image, and when another may take it over.

A delivery claims the images its message names in one conditional UPDATE (attempts counted and
committed before inference, so an image that keeps killing its worker ends ``failed`` instead of
looping). Each claim records its holder (``host:pid``), time and task. A row found
``processing`` belongs to another delivery (a duplicate message, e.g. one the reconcile pass
re-sent): it is left to a live holder and taken over from one that is gone: this process
itself, a process on this host that has exited, a host whose Celery workers no longer answer,
or any holder past ``claim_lease_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from db import claims
from db.claims import Claim, Held
from db.session import session_scope
from worker.settings import Settings

log = logging.getLogger(__name__)

HOSTS_CACHE_SECONDS = 10.0
PING_TIMEOUT_SECONDS = 1.0


def holder_id(pid: int | None = None) -> str:
    """A process as a claim holder, ``host:pid:start`` (what ``Image.claimed_by`` records).

    The start time (clock ticks since boot, from /proc) tells a live process from a new one
    that got a dead holder's pid, as happens in a restarted container.
    """
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    return f"{socket.gethostname()}:{pid}" + (f":{start}" if start is not None else "")


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def holder_gone(held: Held, me: str, lease_seconds: float,
                live_hosts: Callable[[], set[str] | None] | None = None) -> bool:
    """True when nobody works on a held row any more, so this delivery may take it over.

    ``live_hosts`` names the hosts whose Celery workers answer now (None: unknown); it is asked
    only for a holder on another host whose lease has not run out.
    """
    if held.holder is None or held.holder == me:
        return True
    host, pid, start = _parse_holder(held.holder)
    if host == socket.gethostname() and pid is not None and not _same_process(pid, start):
        return True
    age = held.age_seconds()
    if age is None or age >= lease_seconds:
        return True
    if host != socket.gethostname() and live_hosts is not None:
        hosts = live_hosts()
        return hosts is not None and host not in hosts
    return False


def _parse_holder(holder: str) -> tuple[str, int | None, int | None]:
    """(host, pid, start) from ``host:pid[:start]``; host names hold no colon."""
    host, _, rest = holder.partition(":")
    pid, _, start = rest.partition(":")
    return host, int(pid) if pid.isdigit() else None, int(start) if start.isdigit() else None


def _same_process(pid: int, start: int | None) -> bool:
    """Whether the process that claimed is still running (not just its pid reused)."""
    if not _pid_alive(pid):
        return False
    return start is None or _start_time(pid) in (None, start)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


class LiveHosts:
    """Hosts whose Celery workers answer a ping (their heartbeat), cached for a few seconds.

    None when the answer cannot be trusted: no reply at all, not even from this host's own
    worker, means the broker is unreachable rather than every host dead.
    """

    def __init__(self, ping: Callable[[], Iterable[str]] | None = None) -> None:
        self._ping = ping or _celery_ping
        self._hosts: set[str] | None = None
        self._at = float("-inf")

    def __call__(self) -> set[str] | None:
        if time.monotonic() - self._at >= HOSTS_CACHE_SECONDS:
            try:
                names = list(self._ping())
            except Exception as exc:
                log.warning("could not ping the workers (%s)", type(exc).__name__)
                names = []
            hosts = {name.partition("@")[2] or name for name in names}
            self._hosts = hosts if socket.gethostname() in hosts else None
            self._at = time.monotonic()
        return self._hosts


def _celery_ping() -> list[str]:
    from worker.classify.celery_app import app

    return [name for reply in app.control.ping(timeout=PING_TIMEOUT_SECONDS) for name in reply]


@dataclass
class Claimed:
    """What a delivery may classify, and what it found otherwise."""

    claims: list[Claim] = field(default_factory=list)
    failed: list[Claim] = field(default_factory=list)
    """Past ``max_attempts``: now marked ``failed``."""
    left: list[Held] = field(default_factory=list)
    """Held by a live holder, which finishes them."""


def claim_images(settings: Settings, image_ids: Iterable[int], me: str,
                 task_id: str | None = None,
                 live_hosts: Callable[[], set[str] | None] | None = None) -> Claimed:
    """Claim the open images among ``image_ids`` for this delivery (final ones are skipped)."""
    ids = list(image_ids)
    out = Claimed()
    with session_scope(settings.db_url) as session:
        out.claims, held = claims.claim_free(session, ids, settings.max_attempts, me, task_id)
        for image_id in claims.unclaimable(session, ids):
            gave_up = claims.claim(session, image_id, settings.max_attempts, me, task_id)
            if gave_up is not None:
                (out.failed if gave_up.gave_up else out.claims).append(gave_up)
    for row in held:
        if holder_gone(row, me, settings.claim_lease_seconds, live_hosts):
            if row.holder != me:
                log.info("%s: taking it over from %s", settings.describe(row.image_id, None),
                         row.holder or "an unknown holder")
            with session_scope(settings.db_url) as session:
                taken = claims.claim(session, row.image_id, settings.max_attempts, me, task_id)
            if taken is not None:
                (out.failed if taken.gave_up else out.claims).append(taken)
        else:
            out.left.append(row)
    out.claims.sort(key=lambda c: c.image_id)
    return out
