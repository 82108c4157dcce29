"""Sending classify jobs and looking at the queue, by task name.

The watcher and the CLI import this, not ``worker.tasks``, so they never load numpy or the
inference code just to put a message on Redis.
"""

from __future__ import annotations

from worker.celery_app import CLASSIFY_TASK, app, settings


def enqueue(image_id: int, file_name: str) -> None:
    """Send one image to the inference queue; Flower shows only its id and file name."""
    app.send_task(
        CLASSIFY_TASK,
        args=[image_id],
        argsrepr=f"(image_id={image_id}, file={file_name!r})",
        kwargsrepr="{}",
        queue=settings.queue,
    )


def queue_is_empty() -> bool:
    """True when no message waits in the inference queue (reconcile's lost-message check)."""
    with app.connection_for_read() as conn:
        declared = conn.default_channel.queue_declare(queue=settings.queue)
        return declared.message_count == 0
