"""The service (top floor): watcher, intake, Celery tasks, the cascade, supervisor, bench, demo,
and the whole command line (``worker.cli``).

``celery -A worker worker`` finds the app here; it is imported lazily so that light users of
this package (the CLI's ``--help``) do not pay for Celery.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.classify.celery_app import app

        return app
    raise AttributeError(name)
