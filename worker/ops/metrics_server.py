"""Serving the Prometheus metrics: one endpoint for all of a host's processes.

``cxr up`` (and a ``cxr worker`` run on its own, as in compose) gives its processes a private
folder for prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, under the
data dir, emptied at start so a restart does not add an old run's counts twice) and serves
their merged instruments (``worker.classify.metrics``) on ``CXR_METRICS_ADDRESS``:
``CXR_METRICS_PORT``. The queue is read from the database when scraped: how many images wait
in each open status and how long the oldest has waited.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.monitoring import queue_state
from db.session import session_scope
from worker.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_dir(settings: Settings, role: str) -> Path | None:
    """An empty private folder for this host's ``role`` (``up``, ``worker``), named in the
    environment so that processes started from here write their metrics into it; None (with
    a warning: the service runs on without metrics) when the data dir does not allow it."""
    path = settings.data_dir.absolute() / ".metrics" / f"{role}-{socket.gethostname()}"
    try:
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        log.warning("metrics: cannot prepare %s (%s); running without them", path,
                    exc.strerror or exc)
        return None
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def child_metrics_env(path: Path) -> dict[str, str]:
    """What a child of ``cxr up`` needs: write into the shared folder, serve nothing itself."""
    return {MULTIPROC_ENV: str(path), "CXR_METRICS_PORT": "0"}


class QueueCollector:
    """Open images per status and the oldest one's age, read from the database per scrape."""

    def __init__(self, db_url: str):
        self.db_url = db_url

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        try:
            with session_scope(self.db_url) as session:
                counts, oldest = queue_state(session)
        except Exception as exc:  # a scrape must not crash the server; say why once per scrape
            log.warning("metrics: cannot read the queue from the database: %s",
                        type(exc).__name__)
            return
        depth = GaugeMetricFamily("cxr_queue_images", "Images not yet final, by status",
                                  labels=["status"])
        for status, count in sorted(counts.items()):
            depth.add_metric([status], count)
        yield depth
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        yield GaugeMetricFamily("cxr_oldest_queued_age_seconds",
                                "Age of the oldest image not yet final (0 when none)",
                                value=max(0.0, age))


def serve(settings: Settings, path: Path) -> bool:
    """Serve the merged metrics of ``path`` and the queue on the configured address and port;
    False (with a warning) when the port is taken, since the service runs on without them."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(QueueCollector(settings.db_url))
    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_address,
                          registry=registry)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%s (%s); running without them",
                    settings.metrics_address, settings.metrics_port, exc.strerror or exc)
        return False
    return True
