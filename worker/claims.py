"""The claim protocol: which delivery classifies an image, and when another may take it over.

A delivery claims its own image plus up to ``batch_size - 1`` other ``queued`` images (one
conditional UPDATE each time, attempts counted, committed before inference, so an image that
keeps killing its worker ends ``failed`` instead of looping). Each claim records its holder
(``host:pid``) and time. A row found ``processing`` is held by another delivery, alive (its
batch) or dead (a crash): its own task waits for a live holder and takes the row over at once
from a holder that has exited, or after ``claim_lease_seconds`` from one that hangs or whose
host died.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from db import images
from db.images import Claim, Held
from db.session import session_scope
from worker.settings import Settings

FILL_POLL_SECONDS = 0.005
HELD_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)


def holder_id() -> str:
    """This process as a claim holder, ``host:pid`` (what ``images.claimed_by`` records)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_gone(held: Held, me: str, lease_seconds: float) -> bool:
    """True when nobody works on a held row any more, so its own task may take it over.

    That is: the holder is this very process (an earlier delivery here raised), a process on
    this host that has exited (a crash), unknown, or past its lease (hung, or its host died).
    """
    if held.holder is None or held.holder == me:
        return True
    host, _, pid = held.holder.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    age = held.age_seconds()
    return age is None or age >= lease_seconds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def claim_own(
    settings: Settings, image_id: int, me: str, while_held: Callable[[], bool]
) -> Claim | None:
    """Claim this delivery's image; while a live holder has it, call ``while_held`` (other
    useful work; False when there was none, and then wait a moment) and try again.

    Returns None once the image is final (the holder classified it: nothing left to do).
    """
    url = settings.db_url
    while True:
        with session_scope(url) as session:
            own = images.claim_free(session, image_id, settings.max_attempts, me)
        if not isinstance(own, Held):
            return own
        if holder_gone(own, me, settings.claim_lease_seconds):
            if own.holder != me:
                log.info("image %s: taking it over from %s", image_id, own.holder or "unknown")
            with session_scope(url) as session:
                return images.claim(session, image_id, settings.max_attempts, me)
        if not while_held():
            time.sleep(HELD_POLL_SECONDS)


def fill_batch(
    settings: Settings, room: int, exclude: list[int], holder: str | None = None
) -> list[Claim]:
    """Claim queued images until ``room`` are claimed or no new one came for ``batch_wait_ms``.

    The wait restarts whenever images arrive, so a burst still being taken from the inbox
    fills the batch, while a lone image waits ``batch_wait_ms`` once.
    """
    wait = settings.batch_wait_ms / 1000.0
    deadline = time.monotonic() + wait
    claimed: list[Claim] = []
    while True:
        with session_scope(settings.db_url) as session:
            new = images.claim_queued(
                session, room - len(claimed), [*exclude, *(c.image_id for c in claimed)], holder
            )
        claimed += new
        now = time.monotonic()
        if new:
            deadline = now + wait
        if len(claimed) >= room or now >= deadline:
            return claimed
        time.sleep(FILL_POLL_SECONDS)
