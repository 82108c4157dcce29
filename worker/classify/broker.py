"""Sending classify jobs and looking at the queue, by task name.

The watcher and the CLI import this, not ``worker.classify.tasks``, so they never load numpy or the
inference code just to put a message on Redis. One message carries a batch of image ids; Flower
shows them (and their file names unless ``CXR_HIDE_FILE_NAMES``) as the task's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.classify.celery_app import CLASSIFY_TASK, app, settings
from worker.settings import printable


def enqueue_batch(batch: Sequence[tuple[int, str]], countdown: float | None = None) -> None:
    """Send one message for these (image id, file name) pairs to the inference queue."""
    ids = [int(image_id) for image_id, _ in batch]
    if settings.hide_file_names:
        shown = f"(image_ids={ids})"
    else:
        names = [printable(name) for _, name in batch]
        shown = f"(image_ids={ids}, files={names!r})"
    app.send_task(
        CLASSIFY_TASK, args=[ids], argsrepr=shown, kwargsrepr="{}", queue=settings.queue,
        countdown=countdown,
    )


def queue_is_empty() -> bool:
    """True when no message waits in the inference queue (reconcile's lost-message check)."""
    with app.connection_for_read() as conn:
        declared = conn.default_channel.queue_declare(queue=settings.queue)
        return declared.message_count == 0
