"""Messages lost or held: what a starting worker takes back, and which queued rows the
watcher's reconcile pass sends again because no message names them any more.

With late acks, a message a worker received stays in Redis's ``unacked`` hash until that
worker acknowledges it; if the whole worker died (``kill -9``, the OOM killer, a power cut),
Redis hands it out again only after the visibility timeout (an hour by default). A starting
worker puts every unacknowledged message of its queue back at once. Messages a live worker is
still working on come back as duplicates, which are harmless: their images are either final
(skipped) or held by that live worker (left to it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from celery import Celery

from db import images
from worker.settings import Settings

log = logging.getLogger(__name__)


def restore_unacked(app: Celery, queue: str) -> int:
    """Move every unacknowledged message of ``queue`` back onto it; returns how many."""
    restored = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            try:
                _message, _exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                channel.qos.restore_by_tag(tag.decode() if isinstance(tag, bytes) else tag)
                restored += 1
    return restored


def messages_on_their_way(settings: Settings) -> Callable[[], set[int] | None]:
    """Asks the broker which of this deployment's image ids a message still names."""

    def ask() -> set[int] | None:
        from worker.classify.broker import ids_on_their_way, this_deployment

        return ids_on_their_way(this_deployment(settings.db_url))

    return ask


def queued_without_message(session, settings: Settings, grace_seconds: float,
                           waiting: set[int]) -> list[tuple[int, str]]:
    """(id, file name) of ``queued`` rows older than a rescan period that no message in the
    queue or held by a worker names (``waiting``): Redis restarted empty, or was flushed."""
    queued = images.ids_to_enqueue(  # received before 1970: the queued rows only
        session, received_before=datetime(1970, 1, 1, tzinfo=UTC), include_waiting=False,
        queued_before=images.stale_cutoff(max(grace_seconds, settings.rescan_seconds)))
    lost = [row for row in queued if row[0] not in waiting]
    if lost:
        log.warning("%d queued image(s) are named by no message on the broker (first %s; "
                    "Redis restarted empty?): sending them again", len(lost), lost[0][0])
    return lost
