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
from worker.intake import Enqueue, intake_files, reconcile
from worker.settings import Settings
from worker.stability import StabilityTracker

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
MAX_DEPTH = 32
"""Folders nested deeper than this below the inbox are not looked into."""
SCAN_ONLY_SECONDS = 1.0
"""How often the inbox is scanned when no file observer can run on it."""
COMPLETE_EVENTS = frozenset({"closed", "moved"})


class _InboxEvents(FileSystemEventHandler):
    """Observer thread side: turns events into (path, closed, is folder) for the watcher loop."""

    def __init__(self, sink: queue.Queue[tuple[Path, bool, bool]]):
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(os.fsdecode(raw))
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self._sink.put((path, False, True))
            return
        self._sink.put((path, event.event_type in COMPLETE_EVENTS, False))


def scan_inbox(
    inbox: Path, quiet_seconds: float, now: float | None = None, max_depth: int = MAX_DEPTH
) -> list[tuple[Path, bool]]:
    """Every candidate file under ``inbox`` (links not followed, hidden folders skipped, at most
    ``max_depth`` folders deep); files older than ``quiet_seconds`` count as complete.

    Iterative, so no folder tree can exhaust the stack; a folder that cannot be listed is
    skipped.
    """
    now = time.time() if now is None else now
    found = []
    pending: list[tuple[str, int]] = [(os.fspath(inbox), 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith(".") and depth < max_depth:
                        pending.append((entry.path, depth + 1))
                    continue
                if not is_candidate(entry.name) or (entry.is_symlink() and entry.is_dir()):
                    continue  # a linked folder is neither walked nor taken
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            found.append((Path(entry.path), now - mtime >= quiet_seconds))
    return found


class Watcher:
    """The watch loop; ``run(stop)`` blocks until ``stop`` is set."""

    def __init__(self, settings: Settings, enqueue: Enqueue | None = None, polling: bool = False):
        self.settings = settings
        self.enqueue = enqueue
        self.polling = polling
        self.tracker = StabilityTracker(settings.stable_seconds)
        self.events: queue.Queue[tuple[Path, bool, bool]] = queue.Queue()
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
                path, closed, folder = self.events.get_nowait()
            except queue.Empty:
                return
            if folder:
                if path.is_dir() and not path.is_symlink():
                    for found, old in scan_inbox(path, self.settings.stable_seconds):
                        self.tracker.touch(found, closed=old)
            elif is_candidate(path):
                self.tracker.touch(path, closed=closed)

    def _take_due(self) -> None:
        due = self.tracker.due()
        if not due:
            return
        try:
            results = intake_files(due, self.settings, self.enqueue)
        except OperationalError as exc:
            # One line per pass, not a traceback per file: every file would fail alike.
            log.warning("database unreachable (%s); %d file(s) stay in the inbox for the "
                        "next scan", type(exc.orig or exc).__name__, len(due))
            return
        except Exception:
            log.exception("could not take %d file(s); they stay in the inbox for the next scan",
                          len(due))
            return
        self.taken += len(results)
        for result in results:
            log.info("%s: %s", self.settings.describe(result.image_id, result.file_name),
                     result.status)

    def _scan(self) -> None:
        try:
            for path, old in scan_inbox(self.settings.inbox_dir, self.settings.stable_seconds):
                if path not in self.tracker:
                    self.tracker.touch(path, closed=old)
        except Exception:
            log.exception("inbox scan failed")

    def reconcile_once(self) -> None:
        """Scan the inbox for files events missed; re-enqueue rows left behind."""
        self._scan()
        try:
            sent = reconcile(self.settings, self.enqueue)
            if sent:
                log.info("re-enqueued %s image(s) left received or waiting for a model", sent)
        except Exception as exc:
            log.warning("reconcile pass failed (%s: %s); will retry", type(exc).__name__, exc)

    def _start_observer(self):
        """An inotify observer, else a polling one, else None: both walk the tree recursively
        and fail on absurdly deep ones, and then periodic scans alone find the files."""
        for polling in ([self.polling] if self.polling else [False, True]):
            self.polling = polling
            observer = self._observer()
            try:
                observer.start()
                return observer
            except (OSError, RecursionError) as exc:  # e.g. the inotify watch limit
                log.warning("%s observer unavailable (%s: %s)", "polling" if polling else
                            "inotify", type(exc).__name__, str(exc)[:200])
        log.warning("watching %s by scanning it every %.0f s", self.settings.inbox_dir,
                    SCAN_ONLY_SECONDS)
        return None

    def run(self, stop: threading.Event) -> None:
        self.settings.ensure_dirs()
        observer = self._start_observer()
        log.info("watching %s%s", self.settings.inbox_dir, " (polling)" if self.polling else "")
        try:
            self.reconcile_once()
            next_reconcile = time.monotonic() + self.settings.rescan_seconds
            next_scan = time.monotonic() + SCAN_ONLY_SECONDS
            while not stop.is_set():
                try:
                    self._drain_events()
                    self._take_due()
                    now = time.monotonic()
                    if now >= next_reconcile:
                        self.reconcile_once()
                        next_reconcile = time.monotonic() + self.settings.rescan_seconds
                    elif observer is None and now >= next_scan:
                        self._scan()
                        next_scan = time.monotonic() + SCAN_ONLY_SECONDS
                    if observer is not None and not observer.is_alive():
                        log.warning("file observer stopped; restarting it")
                        observer = self._start_observer()
                        self.reconcile_once()
                except Exception:
                    log.exception("watch loop error; carrying on")
                stop.wait(TICK_SECONDS)
        finally:
            if observer is not None:
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
