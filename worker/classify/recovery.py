"""What a worker does when it starts: take back the messages a dead worker held.

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

from celery import Celery

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
