"""Sending classify jobs and looking at the queue, by task name.

The watcher and the CLI import this, not ``worker.classify.tasks``, so they never load numpy or the
inference code just to put a message on Redis. One message carries a batch of image ids and
this database's deployment id (``db.deployment``), so that on a Redis two deployments share a
worker leaves the other one's messages to it. Flower shows the ids (and their file names unless
``CXR_HIDE_FILE_NAMES``) as the task's arguments.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
from collections.abc import Iterator, Sequence

from worker.classify.celery_app import CLASSIFY_TASK, app, settings
from worker.settings import printable

DEPLOYMENT_KWARG = "deployment"
MAX_MESSAGES_READ = 20_000
"""Messages the reconcile pass reads to see which image ids are still on their way; a longer
queue is not an emptied one, and is left alone."""
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
"""kombu's Redis lists for one queue: the plain one and one per priority step."""


@functools.lru_cache(maxsize=8)
def this_deployment(db_url: str) -> str:
    """The deployment id of the database at ``db_url``, read once per process."""
    from db.deployment import deployment_id
    from db.session import session_scope

    with session_scope(db_url) as session:
        return deployment_id(session)


def enqueue_batch(batch: Sequence[tuple[int, str]], countdown: float | None = None) -> None:
    """Send one message for these (image id, file name) pairs to the inference queue."""
    ids = [int(image_id) for image_id, _ in batch]
    if settings.hide_file_names:
        shown = f"(image_ids={ids})"
    else:
        names = [printable(name) for _, name in batch]
        shown = f"(image_ids={ids}, files={names!r})"
    send_ids(ids, this_deployment(settings.db_url), shown, settings.queue, countdown)


def send_ids(ids: list[int], deployment: str | None, shown: str, queue: str,
             countdown: float | None = None) -> None:
    """One classify message for ``ids`` of ``deployment``'s database."""
    app.send_task(
        CLASSIFY_TASK, args=[ids], kwargs={DEPLOYMENT_KWARG: deployment} if deployment else {},
        argsrepr=shown, kwargsrepr="{}", queue=queue, countdown=countdown,
    )


@contextlib.contextmanager
def _reading() -> Iterator:
    """A broker connection for a look at the queue, given up after one quick retry: kombu's
    default retries for about six seconds, and the watcher's loop waits on this read (files
    arriving during a Redis outage should be recorded, and their sends fail, meanwhile)."""
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5)
        yield conn


def queue_is_empty() -> bool:
    """True when no message waits in the inference queue (reconcile's lost-message check)."""
    with _reading() as conn:
        declared = conn.default_channel.queue_declare(queue=settings.queue)
        return declared.message_count == 0


def ids_on_their_way(deployment: str) -> set[int] | None:
    """The image ids of ``deployment`` that a message in the queue, or one a worker holds
    unacknowledged, still names; None when the queue is too long to read (not emptied).

    The queue is read before the unacknowledged set, so a message moving from one to the
    other in between is seen in the second."""
    with _reading() as conn:
        channel = conn.default_channel
        client = channel.client
        keys = [settings.queue + suffix for suffix in _PRIORITY_SUFFIXES]
        if sum(client.llen(key) for key in keys) > MAX_MESSAGES_READ:
            return None
        raw = [m for key in keys for m in client.lrange(key, 0, -1)]
        for held in client.hvals(channel.unacked_key):
            try:
                message, _exchange, routing_key = json.loads(held)
            except (ValueError, TypeError):
                continue
            if routing_key == settings.queue:
                raw.append(message)
    found: set[int] = set()
    for message in raw:
        found.update(_message_ids(message, deployment))
    return found


def _message_ids(message: str | bytes | dict, deployment: str) -> list[int]:
    """The image ids a classify message names for ``deployment`` (a message without an id,
    from before ids, counts for every deployment); [] for anything else."""
    try:
        envelope = json.loads(message) if isinstance(message, str | bytes) else message
        if envelope.get("headers", {}).get("task") != CLASSIFY_TASK:
            return []
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        if kwargs.get(DEPLOYMENT_KWARG, deployment) != deployment:
            return []
        return [int(i) for i in args[0]]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return []
