"""The Celery app: Redis broker, JSON only, late acks, one named inference queue.

Results live in SQL, so there is no result backend. Settings are read once here; worker
processes get their per-process resources (DB engines, TensorFlow threads, the model) after fork.
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready
from kombu import Queue

from trainer.model.runtime import quiet_native_logs, usable_cpus
from worker.settings import Settings

CLASSIFY_TASK = "cxr.classify_images"
RESCORE_TASK = "cxr.rescore_images"
RESCORE_SUFFIX = ".rescore"
"""The re-score queue is ``CXR_QUEUE`` + this: it sorts after the live queue, which a worker
consuming both reads first (``queue_order_strategy: sorted``)."""
THREADS_ENV = "CXR_TF_THREADS"

log = logging.getLogger(__name__)
settings = Settings()
quiet_native_logs(debug=settings.log_level.upper() == "DEBUG")


def make_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (the module-level ``app`` uses the environment).

    A broker URL kombu would split inside its password is refused here: Celery would log the
    pieces it took for a host or path."""
    from db.urls import check_url

    check_url(settings.broker_url, "CXR_BROKER_URL")
    app = Celery("cxr", broker=settings.broker_url, include=["worker.classify.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # kombu's Redis transport polls a worker's queues round robin by default; sorted,
        # the live queue's lists come first in every BRPOP, so re-scores wait for live images
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  "queue_order_strategy": "sorted"},
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue), Queue(settings.queue + RESCORE_SUFFIX)],
        task_routes={CLASSIFY_TASK: {"queue": settings.queue},
                     RESCORE_TASK: {"queue": settings.queue + RESCORE_SUFFIX}},
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_proc_alive_timeout=120,
        timezone="UTC",
    )
    return app


app = make_app(settings)


@celeryd_after_setup.connect
def _share_cores(sender, instance, conf, **_kwargs) -> None:
    """Before the pool forks: each process gets its share of the cores for TensorFlow."""
    processes = max(1, int(getattr(instance, "concurrency", 1) or 1))
    os.environ.setdefault(THREADS_ENV, str(max(1, usable_cpus() // processes)))


@worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    """A forked pool process must not reuse the parent's DB connections."""
    from db.session import dispose_engines

    dispose_engines()


@worker_ready.connect
def _take_back_messages(**_kwargs) -> None:
    """A worker that died whole left its messages unacknowledged: put them back now."""
    from worker.classify.recovery import restore_unacked

    try:
        restored = sum(restore_unacked(app, queue)
                       for queue in (settings.queue, settings.queue + RESCORE_SUFFIX))
    except Exception as exc:  # the broker may be down; Redis's visibility timeout still applies
        log.warning("could not restore unacknowledged messages (%s)", type(exc).__name__)
        return
    if restored:
        log.info("put %d unacknowledged message(s) back on the queue", restored)
