"""``cxr watch``: a watchdog observer on the inbox feeding the intake step.

Events only nominate paths; the stability tracker decides when a file is complete and
``worker.inbox.intake.intake_files`` takes it. A reconcile pass at start-up and every
``rescan_seconds`` scans the inbox and re-enqueues rows the database says were left behind,
so missed events, a watcher restart or a broker outage lose nothing. Per-file errors are
logged and the loop goes on.

The inbox folder is held by a handle opened without following a link; every pass first checks
that the inbox path still is that folder and overlaps none of the service's own, else it takes
nothing that pass and says so (someone who can write the inbox's parent could otherwise swap
it for a link into the archive). What is never taken (a folder it cannot list or too deep, a
FIFO, socket or device node) is said once per entry.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import OperationalError
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from db.exceptions import CxrError
from worker.classify import metrics
from worker.files import safefs
from worker.inbox.filters import is_candidate, is_candidate_in, is_walked_folder, is_walked_in
from worker.inbox.intake import (
    FIRST_BATCH,
    INTAKE_BATCH,
    Enqueue,
    display_name,
    intake_files,
    reconcile,
)
from worker.inbox.stability import StabilityTracker
from worker.settings import Settings

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
"""The longest the loop sleeps: files complete by quiet period are checked this often."""
COALESCE_SECONDS = 0.02
"""After the first event wakes the loop, how long the rest of a burst gets to arrive, so that
it is taken in batches rather than one file at a time."""
DRAIN_LIMIT = 256
"""Events handled per turn of the loop: a burst of thousands is taken a few batches at a time,
so the first batch reaches the workers while the rest are still being read, not after."""
MAX_DEPTH = 32
"""Folders nested deeper than this below the inbox are not looked into."""
SCAN_ONLY_SECONDS = 1.0
"""How often the inbox is scanned when no file observer can run on it."""
COMPLETE_EVENTS = frozenset({"closed", "moved"})
NOMINATING_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent,
                     FileClosedEvent]
"""The only events asked of the kernel. Intake's own open, link, chmod and unlink of every
file it takes would otherwise come back as four events a file for the observer threads to
parse; a file growing without a close is seen by the stability check's own ``stat``."""


class _InboxEvents(FileSystemEventHandler):
    """Observer thread side: turns events into (path, closed, is folder) for the watcher loop."""

    def __init__(self, sink: queue.Queue[tuple[Path, bool, bool]]):
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        if not raw:  # moved out of the inbox
            return
        path = Path(os.fsdecode(raw))
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self._sink.put((path, False, True))
            return
        self._sink.put((path, event.event_type in COMPLETE_EVENTS, False))


Warn = Callable[[object, str, str], None]
"""``warn(key, path, what)``: say once per ``key`` that ``path`` is not taken, and why."""


def scan_inbox(
    inbox: Path, quiet_seconds: float, now: float | None = None, max_depth: int = MAX_DEPTH,
    warn: Warn | None = None,
) -> list[tuple[Path, bool]]:
    """Every candidate file under ``inbox`` (links not followed, hidden folders skipped, at most
    ``max_depth`` folders deep); files older than ``quiet_seconds`` count as complete.

    Iterative, so no folder tree can exhaust the stack; a folder that cannot be listed, one
    too deep and a file that is not a regular file (FIFO, socket, device) are skipped, each
    passed to ``warn``.
    """
    now = time.time() if now is None else now
    warn = warn or (lambda key, path, what: None)
    found = []
    pending: list[tuple[str, int]] = [(os.fspath(inbox), 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            warn(("list", folder), folder, f"a folder the service cannot list ({exc.strerror})")
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if is_walked_folder(entry.name) and depth < max_depth:
                        pending.append((entry.path, depth + 1))
                    elif is_walked_folder(entry.name):
                        warn(("deep", entry.inode()), entry.path,
                             f"a folder more than {max_depth} folders deep")
                    continue
                if not is_candidate(entry.name) or (entry.is_symlink() and entry.is_dir()):
                    continue  # a linked folder is neither walked nor taken
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                warn(("special", st.st_dev, st.st_ino), entry.path,
                     "not a regular file (a FIFO, socket or device node)")
                continue  # never opened: opening one has side effects
            found.append((Path(entry.path), now - st.st_mtime >= quiet_seconds))
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
        self._inbox_fd = -1
        self._inbox: safefs.Identity | None = None
        self._refusal_said = False
        self._warned: set[object] = set()

    def _warn_once(self, key: object, path: str, what: str) -> None:
        """One warning per entry never taken, not one per pass."""
        if key in self._warned:
            return
        self._warned.add(key)
        try:
            name = display_name(Path(path).relative_to(self.settings.inbox_dir).parts)
        except ValueError:
            name = display_name(Path(path).parts)
        log.warning("%s is not taken: %s", self.settings.shown_name(name), what)

    def _inbox_refused(self) -> bool:
        """True when the inbox path is a link, not the folder held since the first pass, or
        overlaps the service's own folders: nothing is taken then, said once a pass."""
        try:
            if self._inbox is None:
                self._inbox_fd = safefs.open_root(self.settings.inbox_dir)
                self._inbox = safefs.identity(os.fstat(self._inbox_fd))
            else:
                os.close(safefs.open_root(self.settings.inbox_dir, self._inbox))
            self.settings.check_layout()
        except (safefs.InboxMoved, CxrError, OSError) as exc:
            self._say_refused(exc)
            return True
        return False

    def _say_refused(self, exc: Exception) -> None:
        if not self._refusal_said:
            self._refusal_said = True
            log.error("taking nothing from the inbox: %s; put the inbox folder back (CXR_INBOX "
                      "must name the folder itself, not a link) or restart the watcher",
                      getattr(exc, "strerror", None) or exc)

    def _observer(self):
        if self.polling:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=max(0.5, min(self.settings.stable_seconds, 2.0)))
        else:
            from watchdog.observers import Observer

            try:  # a file renamed in from outside is a move (complete), not a creation
                observer = Observer(generate_full_events=True)
            except TypeError:  # an observer other than inotify's
                observer = Observer()
        observer.schedule(_InboxEvents(self.events), str(self.settings.inbox_dir), recursive=True,
                          event_filter=NOMINATING_EVENTS)
        return observer

    def _drain_events(self, wait_s: float = 0.0, limit: int = DRAIN_LIMIT) -> None:
        """Hand up to ``limit`` queued events to the tracker; with ``wait_s``, first wait that
        long for one (a drop wakes the loop at once instead of at the next tick)."""
        if wait_s > 0:
            try:
                self._handle(*self.events.get(timeout=wait_s))
            except queue.Empty:
                return
            time.sleep(COALESCE_SECONDS)
        for _ in range(limit):
            try:
                self._handle(*self.events.get_nowait())
            except queue.Empty:
                return

    def _handle(self, path: Path, closed: bool, folder: bool) -> None:
        inbox = self.settings.inbox_dir
        if folder:
            if is_walked_in(inbox, path) and path.is_dir() and not path.is_symlink():
                for found, old in scan_inbox(path, self.settings.stable_seconds,
                                             warn=self._warn_once):
                    self.tracker.touch(found, closed=old)
        elif is_candidate_in(inbox, path, MAX_DEPTH):  # the scan's rule, for events too
            self.tracker.touch(path, closed=closed)

    def _take_due(self, starting: bool = False) -> bool:
        """Take the files complete now; True when there were any. ``starting`` (the last
        turn took nothing): a burst may be starting, so its first message goes out small."""
        due = self.tracker.due()
        if not due or self._inbox_refused():
            return False
        try:
            results = intake_files(due, self.settings, self.enqueue, inbox=self._inbox,
                                   first_batch=FIRST_BATCH if starting else INTAKE_BATCH)
        except safefs.InboxMoved as exc:
            self._say_refused(exc)
            return False
        except OperationalError as exc:
            # One line per pass, not a traceback per file: every file would fail alike.
            log.warning("database unreachable (%s); %d file(s) stay in the inbox for the "
                        "next scan", type(exc.orig or exc).__name__, len(due))
            return False
        except Exception:
            log.exception("could not take %d file(s); they stay in the inbox for the next scan",
                          len(due))
            return False
        self.taken += len(results)
        metrics.observe_intake(self.settings.db_url, results)
        for result in results:
            log.info("%s: %s", self.settings.describe(result.image_id, result.file_name),
                     result.status)
        return True

    def _scan(self) -> None:
        if self._inbox_refused():
            return
        try:
            for path, old in scan_inbox(self.settings.inbox_dir, self.settings.stable_seconds,
                                        warn=self._warn_once):
                if path not in self.tracker:
                    self.tracker.touch(path, closed=old)
        except Exception:
            log.exception("inbox scan failed")

    def reconcile_once(self) -> None:
        """Scan the inbox for files events missed; re-enqueue rows left behind."""
        self._refusal_said = False  # a new pass: a refusal is said again
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
            busy = False
            while not stop.is_set():
                try:
                    self._drain_events(0.0 if busy else TICK_SECONDS)
                    busy = self._take_due(starting=not busy)
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
                    busy = False
                    stop.wait(TICK_SECONDS)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if self._inbox_fd >= 0:
                os.close(self._inbox_fd)
                self._inbox_fd, self._inbox = -1, None


def watch(settings: Settings, polling: bool = False) -> int:
    """Run the watcher in the foreground until SIGINT/SIGTERM."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    Watcher(settings, polling=polling).run(stop)
    return 0
