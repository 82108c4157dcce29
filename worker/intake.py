"""Taking one complete file out of the inbox: the watcher's only side-effecting step.

Hash, move into the content-addressed archive (``archive/ab/<sha256>.<ext>``), record the row,
then enqueue and mark it queued. The row is committed before the enqueue, so a broker outage
leaves rows ``received`` for the reconcile pass; a database outage moves the file back into
the inbox for the next scan. A note in ``archive/.pending/`` lives from just before the move
until the row is committed, so a watcher killed in between leaves the name behind and the
reconcile pass records the file (``adopt_pending``). Nothing taken from the inbox is lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from db import images
from db.session import session_scope
from db.vocabulary import ImageStatus, Stage
from trainer.checksum import sha256_file
from worker.settings import Settings
from worker.storage import archive_relpath, move, private_dirs, reject_unread

log = logging.getLogger(__name__)

Enqueue = Callable[[int, str], None]
RECEIVED_GRACE_SECONDS = 10.0
PENDING_MIN_AGE_SECONDS = 60.0
"""A pending note this old belongs to a watcher that died (an intake takes milliseconds)."""


@dataclass(frozen=True)
class IntakeResult:
    image_id: int
    file_name: str
    status: str


def inbox_name(inbox: Path, path: Path) -> str | None:
    """The path relative to the inbox, or None when it lies (or its folder resolves) outside."""
    inbox = inbox.resolve()
    try:
        parent = path.parent.resolve()
        parent.relative_to(inbox)
    except (OSError, ValueError):
        return None
    return (parent / path.name).relative_to(inbox).as_posix()


def _enqueue_default() -> Enqueue:
    from worker.broker import enqueue

    return enqueue


def intake_file(
    path: Path, settings: Settings, enqueue: Enqueue | None = None
) -> IntakeResult | None:
    """Take one complete inbox file; None when there was nothing to take (gone, not a file)."""
    path = Path(path)
    name = inbox_name(settings.inbox_dir, path)
    if name is None:
        log.warning("ignored a path outside the inbox")
        return None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return _reject_symlink(path, name, settings)
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        sha256 = sha256_file(path)
    except PermissionError:
        return _reject_unreadable(path, name, settings)
    except FileNotFoundError:
        return None
    rel = archive_relpath(sha256, path.suffix)
    data_dir = settings.data_dir.absolute()
    target = data_dir / rel
    private_dirs(settings.archive_dir, target.parent)
    twin_archived = target.exists()
    note = None if twin_archived else _write_pending(settings, name, rel, sha256, st.st_size)
    try:
        if not twin_archived:
            move(path, target)
        os.chmod(target, 0o600)
        with session_scope(settings.db_url) as session:
            image = images.record_image(
                session, sha256=sha256, file_name=name, stored_path=rel.as_posix(),
                size_bytes=st.st_size,
            )
            image_id = image.id
            status = _link_existing(session, image_id, sha256)
    except Exception:
        if not path.exists() and target.exists():  # back to the inbox for the next scan
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, path)
        raise
    finally:
        if note is not None:
            note.unlink(missing_ok=True)
    if twin_archived:
        path.unlink(missing_ok=True)  # only now: the row that points at the twin is committed
    if status == ImageStatus.DONE:
        log.info("image %s (%s): same content already classified; linked", image_id, name)
        return IntakeResult(image_id, name, status)
    status = send(settings, image_id, name, enqueue)
    return IntakeResult(image_id, name, status)


def _pending_dir(settings: Settings) -> Path:
    return settings.archive_dir / ".pending"


def _write_pending(settings: Settings, name: str, rel: Path, sha256: str, size: int) -> Path:
    """The note that survives a crash between the move into the archive and the commit."""
    folder = _pending_dir(settings)
    private_dirs(settings.archive_dir, folder)
    note = folder / f"{uuid.uuid4().hex}.json"
    fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"name": name, "stored_path": rel.as_posix(), "sha256": sha256,
                   "size": size}, fh)
    return note


def adopt_pending(
    settings: Settings,
    enqueue: Enqueue | None = None,
    min_age_seconds: float = PENDING_MIN_AGE_SECONDS,
) -> int:
    """Record (and enqueue) files a killed watcher moved into the archive but never recorded.

    Only notes older than ``min_age_seconds``, so a second watcher's intake in flight is never
    mistaken for a crash. A note whose file never reached the archive, or went back to the
    inbox, or whose row was committed, is simply removed. Returns the number recorded.
    """
    folder = _pending_dir(settings)
    if not folder.is_dir():
        return 0
    data_dir = settings.data_dir.absolute()
    adopted: list[tuple[int, str]] = []
    for note in sorted(folder.glob("*.json")):
        try:
            if time.time() - note.stat().st_mtime < min_age_seconds:
                continue
            entry = json.loads(note.read_text())
        except FileNotFoundError:
            continue
        except ValueError:  # cut short while being written: the move had not happened yet
            note.unlink(missing_ok=True)
            continue
        name, stored = entry["name"], entry["stored_path"]
        if (data_dir / stored).is_file() and not (settings.inbox_dir / name).exists():
            with session_scope(settings.db_url) as session:
                if not images.has_image(session, entry["sha256"], name, stored):
                    image = images.record_image(session, sha256=entry["sha256"], file_name=name,
                                                stored_path=stored, size_bytes=entry["size"])
                    adopted.append((image.id, name))
        note.unlink(missing_ok=True)
    for image_id, name in adopted:
        log.warning("image %s (%s): recorded after a crash between archive and database",
                    image_id, name)
        send(settings, image_id, name, enqueue)
    return len(adopted)


def _link_existing(session, image_id: int, sha256: str) -> str:
    """Link to a prediction the current production models already made for this content."""
    from db import registry

    ids = registry.production_ids(session)
    pneumonia = ids.get(Stage.PNEUMONIA.value)
    if pneumonia is None:
        return ImageStatus.RECEIVED
    existing = images.find_current_prediction(
        session, sha256, pneumonia, ids.get(Stage.INFECTION.value)
    )
    if existing is None:
        return ImageStatus.RECEIVED
    images.link_prediction(session, image_id, existing.id)
    return ImageStatus.DONE


def _reject_symlink(path: Path, name: str, settings: Settings) -> IntakeResult:
    """Links are never followed: the link itself goes to rejected/ with a reason."""
    return _reject_unopened(
        path, name, settings,
        "symbolic link; links are not followed (copy the file itself into the inbox)",
    )


def _reject_unreadable(path: Path, name: str, settings: Settings) -> IntakeResult:
    """A file the service may not read gets a row instead of failing on every scan."""
    return _reject_unopened(
        path, name, settings,
        "permission denied (the service cannot read the file)",
    )


def _reject_unopened(
    path: Path, name: str, settings: Settings, reason: str
) -> IntakeResult:
    """Record why a file we will not read is refused; the file is kept in rejected/."""
    stored = reject_unread(settings, path)
    with session_scope(settings.db_url) as session:
        image = images.record_image(
            session, sha256="", file_name=name, stored_path=stored,
            size_bytes=None, status=ImageStatus.REJECTED, error=reason,
        )
        image_id = image.id
    log.info("image %s (%s) rejected: %s", image_id, name, reason.split(";")[0])
    return IntakeResult(image_id, name, ImageStatus.REJECTED)


def send(settings: Settings, image_id: int, file_name: str, enqueue: Enqueue | None = None) -> str:
    """Enqueue one recorded image and mark it queued; a broker error leaves it for reconcile."""
    enqueue = enqueue or _enqueue_default()
    try:
        enqueue(image_id, file_name)
    except Exception as exc:
        log.warning("image %s (%s): enqueue failed (%s); will retry", image_id, file_name,
                    type(exc).__name__)
        return ImageStatus.RECEIVED
    try:
        with session_scope(settings.db_url) as session:
            images.mark_queued(session, image_id)
    except Exception as exc:  # the job is on its way; the row just still says received
        log.warning("image %s (%s): could not mark queued (%s)", image_id, file_name,
                    type(exc).__name__)
    return ImageStatus.QUEUED


def _has_production_model(session) -> bool:
    from db import registry

    return Stage.PNEUMONIA.value in registry.production_ids(session)


def reconcile(
    settings: Settings,
    enqueue: Enqueue | None = None,
    grace_seconds: float = RECEIVED_GRACE_SECONDS,
    queue_empty: Callable[[], bool] | None = None,
) -> int:
    """Enqueue rows left ``received``, ``waiting_model`` rows once a model exists, and
    ``queued`` rows whose message is gone (queue empty, row older than the visibility timeout).

    ``queue_empty`` defaults to asking the broker when ``enqueue`` is the real one.
    """
    if queue_empty is None:
        queue_empty = _queue_empty_default() if enqueue is None else (lambda: False)
    try:
        lost_messages = queue_empty()
    except Exception as exc:
        log.warning("could not read the broker queue (%s)", type(exc).__name__)
        lost_messages = False
    with session_scope(settings.db_url) as session:
        rows = images.ids_to_enqueue(
            session,
            received_before=images.stale_cutoff(grace_seconds),
            include_waiting=_has_production_model(session),
            queued_before=images.stale_cutoff(max(grace_seconds, settings.visibility_timeout))
            if lost_messages
            else None,
        )
    return sum(send(settings, i, name, enqueue) == ImageStatus.QUEUED for i, name in rows)


def _queue_empty_default() -> Callable[[], bool]:
    from worker.broker import queue_is_empty

    return queue_is_empty


def requeue_waiting(settings: Settings, enqueue: Enqueue | None = None) -> int:
    """Re-queue ``waiting_model`` images now (``cxr models promote`` calls this)."""
    with session_scope(settings.db_url) as session:
        if not _has_production_model(session):
            return 0
        rows = images.waiting_ids(session)
    return sum(send(settings, i, name, enqueue) == ImageStatus.QUEUED for i, name in rows)
