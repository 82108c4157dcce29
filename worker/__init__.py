"""Inference side: Celery app and tasks, the inbox watcher, image decoding, the cascade, the CLI.

``celery -A worker worker`` finds the app here; it is imported lazily so that light users of
this package (the CLI's ``--help``, ``worker.exceptions``) do not pay for Celery.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(name)
