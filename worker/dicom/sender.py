"""``cxr dicom send``: drains the outbox. Each pass adds a row for every finished image that
owes its destinations a result (so the worker's path is untouched), then builds and sends what
is due, one association per destination; a failed try records why and waits longer each time
(up to CXR_DICOM_RETRY_MAX_SECONDS). Rows stay until sent: a PACS that is down, or a sender
that restarts, costs a delay, never a result. At least once: a retry resends the same UIDs.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from db.outbox import OutboxItem, due_items, fill_outbox, mark_failed, mark_sent, result_for
from db.session import session_scope
from worker.dicom.peers import Destination, parse_destinations
from worker.dicom.reports import heatmap_sc, result_sr
from worker.dicom.scu import SendError, store
from worker.settings import Settings

log = logging.getLogger(__name__)
EXPORT = "export"
POLL_SECONDS = 1.0


@dataclass
class SenderConfig:
    db_url: str
    data_dir: Path
    destinations: list[Destination] = field(default_factory=list)
    export_dir: Path | None = None
    ae_title: str = "CXR"
    send_heatmaps: bool = False
    report_all: bool = False
    retry_max_seconds: float = 300.0
    timeout_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SenderConfig:
        return cls(settings.db_url, settings.data_dir.absolute(),
                   parse_destinations(settings.dicom_destinations), settings.dicom_export_dir,
                   settings.dicom_ae_title, settings.dicom_send_heatmaps,
                   settings.dicom_report_all, settings.dicom_retry_max_seconds,
                   settings.dicom_timeout_seconds)

    @property
    def targets(self) -> list[str]:
        return [str(d) for d in self.destinations] + ([EXPORT] if self.export_dir else [])

    @property
    def kinds(self) -> list[str]:
        return ["sr", "sc"] if self.send_heatmaps else ["sr"]


def retry_delay(attempts: int, cap: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 1, 2, 4 ... up to ``cap``."""
    return min(cap, 2.0 ** min(attempts, 30))


def stand_in_source(image_id: int, sha256: str) -> Dataset:
    """For a JPEG or PNG (CXR_DICOM_REPORT_ALL): a header naming a study of its own, with
    UIDs made from the file's content so every try names the same study."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cxr-triage", sha256, str(image_id)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["cxr-triage-study", sha256])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["cxr-triage-series", sha256])
    ds.Modality = "OT"
    return ds


def _heatmap_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def build(config: SenderConfig, item: OutboxItem) -> Dataset | None:
    """The object a row stands for; None when there is nothing to send (no heatmap)."""
    with session_scope(config.db_url) as session:
        result = result_for(session, item.image_id)
    if result is None:
        raise LookupError("its image row is gone")
    if not result.get("sop_instance_uid"):
        source = stand_in_source(item.image_id, result["sha256"])
    elif result.get("stored_path"):
        source = dcmread(config.data_dir / result["stored_path"], stop_before_pixels=True)
    else:  # never a made-up study for a DICOM: its own header says where the result goes
        raise LookupError("its archived file is not recorded")
    if item.kind == "sr":
        return result_sr(source, result, item.sop_instance_uid)
    if not result.get("heatmap_path"):
        return None
    rgb = _heatmap_pixels(config.data_dir / result["heatmap_path"])
    return heatmap_sc(source, rgb, item.sop_instance_uid)


def export(folder: Path, datasets: list[Dataset]) -> None:
    """Write each object to ``folder/<study>/<sop>.dcm``, complete or not at all."""
    for ds in datasets:
        target = folder / str(ds.StudyInstanceUID)
        target.mkdir(parents=True, exist_ok=True)
        temp = target / f".{uuid.uuid4().hex}.part"
        ds.save_as(temp, enforce_file_format=True)
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, target / f"{ds.SOPInstanceUID}.dcm")


def _deliver(config: SenderConfig, destination: str, datasets: list[Dataset]) -> None:
    if destination == EXPORT:
        assert config.export_dir is not None
        export(config.export_dir, datasets)
        return
    peer = next(d for d in config.destinations if str(d) == destination)
    store(peer, datasets, config.ae_title, config.timeout_seconds)


def _why(exc: Exception) -> str:
    """A failure as the outbox shows it: what failed, never patient data."""
    if isinstance(exc, SendError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    if isinstance(exc, LookupError):
        return f"could not build the object: {exc}"
    return f"could not build the object: {type(exc).__name__}"


def _send_group(config: SenderConfig, destination: str, items: list[OutboxItem]) -> int:
    ready: list[tuple[OutboxItem, Dataset]] = []
    nothing: list[int] = []
    for item in items:
        try:
            ds = build(config, item)
        except Exception as exc:
            _record(config, [item], _why(exc))
            continue
        if ds is None:
            nothing.append(item.id)
        else:
            ready.append((item, ds))
    if nothing:
        with session_scope(config.db_url) as session:
            mark_sent(session, nothing)  # no heatmap to send: done
    if not ready:
        return 0
    try:
        _deliver(config, destination, [ds for _, ds in ready])
    except (SendError, OSError) as exc:
        _record(config, [item for item, _ in ready], _why(exc))
        return 0
    with session_scope(config.db_url) as session:
        mark_sent(session, [item.id for item, _ in ready])
    log.info("sent %d DICOM result(s) to %s", len(ready), destination)
    return len(ready)


def _record(config: SenderConfig, items: list[OutboxItem], why: str) -> None:
    log.warning("%d DICOM result(s) not sent: %s; trying again later", len(items), why)
    with session_scope(config.db_url) as session:
        for item in items:
            mark_failed(session, [item.id], why,
                        retry_delay(item.attempts, config.retry_max_seconds))


def pass_once(config: SenderConfig) -> int:
    """Fill the outbox, send what is due; how many objects were sent."""
    if not config.targets:
        return 0
    with session_scope(config.db_url) as session:
        fill_outbox(session, config.targets, config.kinds, dicom_only=not config.report_all)
    with session_scope(config.db_url) as session:
        items = due_items(session, config.targets)
    groups: dict[str, list[OutboxItem]] = defaultdict(list)
    for item in items:
        groups[item.destination].append(item)
    return sum(_send_group(config, dest, group) for dest, group in groups.items())


def run_sender(settings: Settings, stop: threading.Event, once: bool = False) -> int:
    from worker.dicom.listener import quiet_pynetdicom

    quiet_pynetdicom()
    config = SenderConfig.from_settings(settings)
    if not config.targets:
        log.warning("no CXR_DICOM_DESTINATIONS and no CXR_DICOM_EXPORT_DIR: nothing to send")
    log.info("DICOM sender to %s", ", ".join(config.targets) or "nowhere")
    while not stop.is_set():
        try:
            sent = pass_once(config)
        except Exception:
            log.exception("DICOM sender pass failed; trying again")
            sent = 0
        if once:
            break
        if not sent:
            stop.wait(POLL_SECONDS)
    return 0
