"""Taking complete files out of the inbox: the watcher's only side-effecting step, in batches.

For each file, through handles only (``worker.files.safefs``): open it once without following links,
check it (a regular file, one link, not too large), and copy it into the archive while hashing
it, in one pass. Then, for the whole batch: record the rows in one transaction, remove the inbox
entries that still are the files copied, enqueue one message for the batch and mark its rows
queued. The inbox file is removed only after its row is committed, so a crash or a database
outage at any point leaves the file in the inbox for the next scan (at worst an unreferenced
archive copy, which the next intake of that content reuses). A broker outage leaves rows
``received`` for the reconcile pass. Nothing taken from the inbox is lost.

Files the service will not read (links, unreadable, hard-linked, too large) get a ``rejected``
row with the reason and are moved, as entries, into ``rejected/``; an entry that cannot be moved
stays where it is, recorded once, and costs nothing to the rest of its batch.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path, PurePosixPath

from db import images, predictions, registry
from db.session import session_scope
from db.vocabulary import ImageStatus, Stage
from worker.classify.recovery import messages_on_their_way, queued_without_message
from worker.files import safefs, storage
from worker.files.storage import archive_relpath, private_dirs, rejected_name
from worker.settings import Settings

log = logging.getLogger(__name__)

Enqueue = Callable[[Sequence[tuple[int, str]]], None]
"""Sends one message for a batch of (image id, file name)."""
RECEIVED_GRACE_SECONDS = 10.0
STALE_TEMP_SECONDS = 3600.0
INTAKE_THREADS = 2
"""Hashing threads. More only queue for the GIL behind the thread that records and sends: a
5,000-file burst on two cores went faster with 2 than with 4 or 8."""
INTAKE_BATCH = 128
"""Files per transaction (each holds an open handle until its row is committed)."""
FIRST_BATCH = 16
"""Files in a burst's first transaction, so that its first message reaches an idle worker
after 16 files are hashed instead of 128."""


@dataclass(frozen=True)
class IntakeResult:
    image_id: int
    file_name: str
    status: str


@dataclass
class _Taken:
    """A file copied into the archive, not yet recorded."""

    entry: safefs.Entry
    name: str
    sha256: str
    size: int
    stored: str


@dataclass
class _Refused:
    """An inbox entry the service will not read, and why."""

    folder: int
    entry_name: str
    name: str
    reason: str


def inbox_parts(inbox: Path, path: Path) -> tuple[str, ...] | None:
    """``path``'s components below ``inbox``, lexically (links are caught when opening);
    None when it is not below the inbox or climbs out with ``..``."""
    try:
        parts = Path(path).relative_to(inbox).parts
    except ValueError:
        return None
    if not parts or any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def display_name(parts: Sequence[str]) -> str:
    """The name recorded for a file: its inbox-relative path as valid UTF-8 (bytes that are
    not UTF-8 become U+FFFD, so every database accepts it)."""
    raw = PurePosixPath(*parts).as_posix()
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def intake_files(paths: Iterable[Path], settings: Settings, enqueue: Enqueue | None = None,
                 threads: int = INTAKE_THREADS, inbox: safefs.Identity | None = None,
                 first_batch: int = INTAKE_BATCH) -> list[IntakeResult]:
    """Take complete inbox files in batches: the next batch is hashed and copied in threads
    while the current one is recorded (one transaction) and sent (one ``send``); returns a
    result for each file taken or refused; the first batch holds ``first_batch`` files.

    ``inbox``: the identity of the inbox folder the caller holds; raises
    ``safefs.InboxMoved`` (taking nothing) when the inbox path is a link or another folder.
    """
    storage.prepare_archive(settings)
    paths = [Path(p) for p in paths]
    first = max(1, min(first_batch, INTAKE_BATCH))
    bounds = [0, *range(first, len(paths), INTAKE_BATCH), len(paths)] if paths else []
    chunks = [paths[a:b] for a, b in pairwise(bounds)]
    results: list[IntakeResult] = []
    no_space: list[OSError] = []
    archive = os.open(settings.archive_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        folders = safefs.Folders(settings.inbox_dir, inbox)
    except BaseException:
        os.close(archive)
        raise
    with folders, ThreadPoolExecutor(max(1, threads)) as pool:
        def start(chunk: list[Path]) -> list:
            return [pool.submit(_prepare, path, settings, folders, archive) for path in chunk]

        try:
            pending = start(chunks[0]) if chunks else []
            for k in range(len(chunks)):
                prepared = [future.result() for future in pending]
                no_space += [p for p in prepared if isinstance(p, OSError)]
                pending = start(chunks[k + 1]) if k + 1 < len(chunks) else []
                try:
                    results += _commit(prepared, settings, enqueue)
                except BaseException:
                    _release([future.result() for future in pending])
                    raise
        finally:
            os.close(archive)
    if no_space:  # one line for the pass, not a traceback per file: every file fails alike
        log.warning("the archive's disk is full (%s); %d file(s) stay in the inbox for the next "
                    "scan", no_space[0].strerror, len(no_space))
    return results


def _release(prepared: list) -> None:
    """Close the files prepared but not committed (they stay in the inbox)."""
    for item in prepared:
        if isinstance(item, _Taken):
            item.entry.close()


def _commit(prepared: list, settings: Settings, enqueue: Enqueue | None) -> list[IntakeResult]:
    taken = [p for p in prepared if isinstance(p, _Taken)]
    refused = [p for p in prepared if isinstance(p, _Refused)]
    try:
        results = _record_refusals(refused, settings)
        results += _record_taken(taken, settings)
    finally:
        _release(prepared)
    to_send = [(r.image_id, r.file_name) for r in results if r.status == ImageStatus.RECEIVED]
    queued = set(send(settings, to_send, enqueue)) if to_send else set()
    return [IntakeResult(r.image_id, r.file_name, ImageStatus.QUEUED)
            if r.image_id in queued else r for r in results]


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def _prepare(path: Path, settings: Settings, folders: safefs.Folders, archive: int
             ) -> _Taken | _Refused | OSError | None:
    """Open, check, copy and hash one file; never raises for a file-level problem. A full
    disk is returned (the caller says so once for the whole pass)."""
    parts = inbox_parts(settings.inbox_dir, path)
    if parts is None:
        log.warning("ignored a path outside the inbox")
        return None
    try:
        folder = folders.open(parts[:-1])
    except (safefs.Unreachable, OSError):
        return None  # a folder on the way vanished or was swapped for a link
    name = display_name(parts)
    try:
        return _prepare_in(folder, parts[-1], name, settings, archive)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        log.exception("could not take %s; it stays in the inbox", settings.shown_name(name))
        return None


def _prepare_in(folder: int, entry_name: str, name: str, settings: Settings, archive: int
                ) -> _Taken | _Refused | None:
    try:
        entry = safefs.open_entry(folder, entry_name)
    except OSError as exc:
        if exc.errno == errno.ELOOP or safefs.is_link(folder, entry_name):
            return _Refused(folder, entry_name, name, "symbolic link; links are not followed "
                            "(copy the file itself into the inbox)")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return _Refused(folder, entry_name, name,
                            "permission denied (the service cannot read the file)")
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return None
        raise
    if entry is None:  # a FIFO, socket or device node: never opened (the scan says so)
        return None
    st = entry.st
    if not stat.S_ISREG(st.st_mode) or storage.left_in_inbox_key(st) in storage.left_in_inbox(
            settings):  # recorded already, and left in the inbox
        entry.close()
        return None
    try:
        return _take_opened(entry, name, settings, archive)
    except BaseException:
        entry.close()
        raise


def _take_opened(entry: safefs.Entry, name: str, settings: Settings, archive: int
                 ) -> _Taken | _Refused | None:
    """Checks, then the archive copy (a hard link when possible); closes ``entry`` unless it
    returns a ``_Taken``."""
    st = entry.st
    suffix = PurePosixPath(name).suffix
    if st.st_size > settings.max_file_bytes:
        entry.close()
        return _Refused(entry.folder, entry.name, name,
                        f"file too large: {st.st_size:,} bytes (the limit, CXR_MAX_FILE_BYTES, "
                        f"is {settings.max_file_bytes:,})")
    if st.st_nlink > 1:
        return _own_link_or_refusal(entry, name, settings)
    tmp = (safefs.link_entry(entry, settings.archive_dir, archive) if st.st_uid == os.geteuid()
           else None)
    if tmp is not None:
        sha256, size = safefs.hash_entry(entry)
    else:
        tmp, sha256, size = safefs.copy_hashing(entry, settings.archive_dir)
    if entry.changed():  # still being written: the next scan takes it whole
        tmp.unlink(missing_ok=True)
        entry.close()
        return None
    rel = archive_relpath(sha256, suffix)
    target = settings.data_dir.absolute() / rel
    if target.exists():
        tmp.unlink()
    else:
        storage.into_archive(settings, tmp, target)
    return _Taken(entry, name, sha256, size, rel.as_posix())


def _own_link_or_refusal(entry: safefs.Entry, name: str, settings: Settings
                         ) -> _Taken | _Refused:
    """A file with a second name is refused, unless that name is its own archive link left by
    an intake that was killed before its commit."""
    sha256, size = safefs.hash_entry(entry)
    rel = archive_relpath(sha256, PurePosixPath(name).suffix)
    target = settings.data_dir.absolute() / rel
    try:
        ours = entry.st.st_nlink == 2 and safefs.same_file(os.stat(target), entry.st)
    except FileNotFoundError:
        ours = False
    if ours:
        return _Taken(entry, name, sha256, size, rel.as_posix())
    entry.close()
    return _Refused(entry.folder, entry.name, name,
                    f"the file has {entry.st.st_nlink} hard links; only files with a single "
                    "name are taken (copy the file into the inbox)")


def _record_taken(taken: list[_Taken], settings: Settings) -> list[IntakeResult]:
    """One transaction for the batch; the inbox entries go only once it is committed."""
    if not taken:
        return []
    with session_scope(settings.db_url) as session:
        ids = images.record_images(session, [
            {"sha256": t.sha256, "file_name": t.name, "stored_path": t.stored, "size_bytes": t.size}
            for t in taken
        ])
        linked = _link_existing(session, ids, [t.sha256 for t in taken])
    results = [IntakeResult(image_id, item.name,
                            ImageStatus.DONE if image_id in linked else ImageStatus.RECEIVED)
               for image_id, item in zip(ids, taken, strict=True)]
    for item, result in zip(taken, results, strict=True):
        _remove_from_inbox(item, settings)
        if result.status == ImageStatus.DONE:
            log.info("%s: same content already classified; linked",
                     settings.describe(result.image_id, result.file_name))
    return results


def _remove_from_inbox(item: _Taken, settings: Settings) -> None:
    try:
        safefs.remove_entry(item.entry.folder, item.entry.name, item.entry.st)
    except OSError as exc:
        storage.note_left_in_inbox(settings, storage.left_in_inbox_key(os.fstat(item.entry.fd)))
        log.warning("%s is recorded but stays in the inbox: it cannot be removed (%s); let the "
                    "service user write that folder", settings.shown_name(item.name),
                    exc.strerror or exc)


def _link_existing(session, image_ids: list[int], sha256s: list[str]) -> set[int]:
    """Link images to predictions the current production models already made for their
    content; returns the ids linked (now ``done``)."""
    production = registry.production_ids(session)
    pneumonia = production.get(Stage.PNEUMONIA.value)
    if pneumonia is None:
        return set()
    known = predictions.current_predictions(session, sha256s, pneumonia,
                                       production.get(Stage.INFECTION.value))
    linked = set()
    for image_id, sha256 in zip(image_ids, sha256s, strict=True):
        if sha256 in known and predictions.link_prediction(session, image_id, known[sha256]):
            linked.add(image_id)
    return linked


def _record_refusals(refused: list[_Refused], settings: Settings) -> list[IntakeResult]:
    """Move each refused entry into rejected/ (a rename: no read needed) and record why. An
    entry that cannot be moved (rejected/ on another filesystem, a folder the service may not
    write) stays in the inbox, recorded once: it costs that entry only."""
    results = []
    for item in refused:
        private_dirs(settings.rejected_dir, settings.rejected_dir)
        target = rejected_name(item.entry_name)
        try:
            moved = safefs.move_entry(item.folder, item.entry_name, settings.rejected_dir,
                                      target)
            left = None if moved else "rejected/ is on another filesystem"
        except OSError as exc:
            left = f"it cannot be moved to rejected/: {exc.strerror or type(exc).__name__}"
        reason = item.reason if left is None else f"{item.reason}; left in the inbox ({left})"
        stored = f"rejected/{target}" if left is None else None
        with session_scope(settings.db_url) as session:
            if left is not None and images.has_rejection(session, item.name, reason):
                continue
            image = images.record_image(
                session, sha256="", file_name=item.name, stored_path=stored, size_bytes=None,
                status=ImageStatus.REJECTED, error=reason,
            )
            image_id = image.id
        log.info("%s rejected: %s", settings.describe(image_id, item.name), reason.split(";")[0])
        results.append(IntakeResult(image_id, item.name, ImageStatus.REJECTED))
    return results


def _enqueue_default() -> Enqueue:
    from worker.classify.broker import enqueue_batch

    return enqueue_batch


def send(settings: Settings, batch: Sequence[tuple[int, str]], enqueue: Enqueue | None = None
         ) -> list[int]:
    """Enqueue recorded images (one message per ``message_size`` of them) and mark them queued;
    returns the ids sent. A broker error leaves the rest ``received`` for the reconcile pass."""
    enqueue = enqueue or _enqueue_default()
    size = max(1, settings.message_size)
    sent: list[int] = []
    for start in range(0, len(batch), size):
        chunk = list(batch[start:start + size])
        try:
            enqueue(chunk)
        except Exception as exc:
            log.warning("%d image(s) (first %s): enqueue failed (%s); will retry", len(chunk),
                        settings.describe(*chunk[0]), type(exc).__name__)
            break
        sent += [image_id for image_id, _ in chunk]
    if sent:
        try:
            with session_scope(settings.db_url) as session:
                images.mark_queued_many(session, sent)
        except Exception as exc:  # the jobs are on their way; the rows just still say received
            log.warning("could not mark %d image(s) queued (%s)", len(sent), type(exc).__name__)
    return sent


def reconcile(
    settings: Settings,
    enqueue: Enqueue | None = None,
    grace_seconds: float = RECEIVED_GRACE_SECONDS,
    queue_empty: Callable[[], bool] | None = None,
    on_their_way: Callable[[], set[int] | None] | None = None,
) -> int:
    """Enqueue rows left ``received``, ``waiting_model`` rows once a model exists, ``queued``
    rows whose message is gone, and ``processing`` rows whose claim outlived its lease (a
    holder that hangs or vanished).

    A ``queued`` row's message is gone when, a rescan period after receipt, no message in the
    queue or held by a worker names it (``on_their_way``: Redis restarted empty mid-burst), or
    when the queue is empty and the row is older than the visibility timeout. Both default to
    asking the broker when ``enqueue`` is the real one; a message sent twice is harmless (the
    claims classify an image once).
    """
    remove_stale_temps(settings)
    if queue_empty is None:
        queue_empty = _queue_empty_default() if enqueue is None else (lambda: False)
    if on_their_way is None:
        on_their_way = messages_on_their_way(settings) if enqueue is None else (lambda: None)
    try:
        lost_messages = queue_empty()
        waiting = on_their_way()
    except Exception as exc:
        log.warning("could not read the broker queue (%s)", type(exc).__name__)
        lost_messages, waiting = False, None
    with session_scope(settings.db_url) as session:
        rows = images.ids_to_enqueue(
            session,
            received_before=images.stale_cutoff(grace_seconds),
            include_waiting=registry.has_production(session),
            queued_before=images.stale_cutoff(max(grace_seconds, settings.visibility_timeout))
            if lost_messages
            else None,
            claimed_before=images.stale_cutoff(settings.claim_lease_seconds),
        )
        if waiting is not None:
            rows += queued_without_message(session, settings, grace_seconds, waiting)
    rows = sorted(dict(rows).items())
    return len(send(settings, rows, enqueue)) if rows else 0


def remove_stale_temps(settings: Settings, min_age_seconds: float = STALE_TEMP_SECONDS) -> int:
    """Delete archive temp files a killed watcher left mid-copy (their inbox file is still
    there and is taken again)."""
    removed = 0
    now = time.time()
    for tmp in settings.archive_dir.glob(".incoming-*.tmp"):
        try:
            if now - tmp.stat().st_mtime >= min_age_seconds:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _queue_empty_default() -> Callable[[], bool]:
    from worker.classify.broker import queue_is_empty

    return queue_is_empty


def requeue_waiting(settings: Settings, enqueue: Enqueue | None = None) -> int:
    """Re-queue ``waiting_model`` images now (``cxr models promote`` calls this)."""
    with session_scope(settings.db_url) as session:
        if not registry.has_production(session):
            return 0
        rows = images.waiting_ids(session)
    return len(send(settings, rows, enqueue)) if rows else 0
