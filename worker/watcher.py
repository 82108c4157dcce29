"""``cxr watch``: a watchdog observer on the inbox feeding the intake step.

Events only nominate paths; the stability tracker decides when a file is complete and
``worker.intake.intake_file`` takes it. A reconcile pass at start-up and every
``rescan_seconds`` scans the inbox and re-enqueues rows the database says were left behind,
so missed events, a watcher restart or a broker outage lose nothing. Per-file errors are
logged and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

from sqlalchemy.exc import OperationalError
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from worker.filters import is_candidate
from worker.intake import Enqueue, adopt_pending, intake_file, reconcile
from worker.settings import Settings
from worker.stability import StabilityTracker

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
COMPLETE_EVENTS = frozenset({"closed", "moved"})


class _InboxEvents(FileSystemEventHandler):
    """Observer thread side: turns events into (path, closed) for the watcher loop."""

    def __init__(self, sink: queue.Queue[tuple[Path, bool]]):
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(os.fsdecode(raw))
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self._sink.put((path, False))
            return
        self._sink.put((path, event.event_type in COMPLETE_EVENTS))


def scan_inbox(
    inbox: Path, quiet_seconds: float, now: float | None = None
) -> list[tuple[Path, bool]]:
    """Every candidate file under ``inbox`` (links not followed); old files count as complete."""
    now = time.time() if now is None else now
    found = []
    for root, dirs, files in os.walk(inbox):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(root) / name
            if not is_candidate(path):
                continue
            try:
                mtime = os.lstat(path).st_mtime
            except OSError:
                continue
            found.append((path, now - mtime >= quiet_seconds))
    return found


class Watcher:
    """The watch loop; ``run(stop)`` blocks until ``stop`` is set."""

    def __init__(self, settings: Settings, enqueue: Enqueue | None = None, polling: bool = False):
        self.settings = settings
        self.enqueue = enqueue
        self.polling = polling
        self.tracker = StabilityTracker(settings.stable_seconds)
        self.events: queue.Queue[tuple[Path, bool]] = queue.Queue()
        self.taken = 0

    def _observer(self):
        if self.polling:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=max(0.5, min(self.settings.stable_seconds, 2.0)))
        else:
            from watchdog.observers import Observer

            observer = Observer()
        observer.schedule(_InboxEvents(self.events), str(self.settings.inbox_dir), recursive=True)
        return observer

    def _drain_events(self) -> None:
        while True:
            try:
                path, closed = self.events.get_nowait()
            except queue.Empty:
                return
            if path.is_dir() and not path.is_symlink():
                for found, old in scan_inbox(path, self.settings.stable_seconds):
                    self.tracker.touch(found, closed=old)
            elif is_candidate(path):
                self.tracker.touch(path, closed=closed)

    def _take_due(self) -> None:
        due = self.tracker.due()
        for n, path in enumerate(due):
            try:
                result = intake_file(path, self.settings, self.enqueue)
            except OperationalError as exc:
                # One line per pass, not a traceback per file: every file would fail alike.
                log.warning("database unreachable (%s); %d file(s) stay in the inbox for the "
                            "next scan", type(exc.orig or exc).__name__, len(due) - n)
                return
            except Exception:
                log.exception("could not take %s; it stays in the inbox for the next scan",
                              path.name)
                continue
            if result is not None:
                self.taken += 1
                log.info("image %s (%s): %s", result.image_id, result.file_name, result.status)

    def reconcile_once(self) -> None:
        """Scan the inbox for files events missed; re-enqueue rows left behind."""
        try:
            for path, old in scan_inbox(self.settings.inbox_dir, self.settings.stable_seconds):
                if path not in self.tracker:
                    self.tracker.touch(path, closed=old)
        except Exception:
            log.exception("inbox scan failed")
        try:
            adopt_pending(self.settings, self.enqueue)
            sent = reconcile(self.settings, self.enqueue)
            if sent:
                log.info("re-enqueued %s image(s) left received or waiting for a model", sent)
        except Exception as exc:
            log.warning("reconcile pass failed (%s: %s); will retry", type(exc).__name__, exc)

    def _start_observer(self):
        observer = self._observer()
        try:
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit; polling needs no kernel watches
            if self.polling:
                raise
            log.warning("inotify unavailable (%s); falling back to polling", exc)
            self.polling = True
            observer = self._observer()
            observer.start()
        return observer

    def run(self, stop: threading.Event) -> None:
        self.settings.ensure_dirs()
        observer = self._start_observer()
        log.info("watching %s%s", self.settings.inbox_dir, " (polling)" if self.polling else "")
        try:
            self.reconcile_once()
            next_reconcile = time.monotonic() + self.settings.rescan_seconds
            while not stop.is_set():
                try:
                    self._drain_events()
                    self._take_due()
                    if time.monotonic() >= next_reconcile:
                        self.reconcile_once()
                        next_reconcile = time.monotonic() + self.settings.rescan_seconds
                    if not observer.is_alive():
                        log.warning("file observer stopped; restarting it")
                        observer = self._start_observer()
                        self.reconcile_once()
                except Exception:
                    log.exception("watch loop error; carrying on")
                stop.wait(TICK_SECONDS)
        finally:
            observer.stop()
            observer.join(timeout=5)


def watch(settings: Settings, polling: bool = False) -> int:
    """Run the watcher in the foreground until SIGINT/SIGTERM."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    Watcher(settings, polling=polling).run(stop)
    return 0
