"""DICOM through the real pipeline: watcher, ``celery -A worker worker``, a private Redis and
SQLite. Results carry the study identifiers; the patient's name, id and birth date written in
every file appear nowhere: not in the database file, not in the logs, not in anything that
crossed the broker (every command Redis saw, through MONITOR, with message bodies decoded).
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import threading

import pytest
from helpers_dicom import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, UIDS, make_ds, texture, to_bytes
from helpers_models import register_tiny_bundle
from helpers_pipeline import drop, pipeline_session
from pydicom.uid import ExplicitVRBigEndian, JPEGLSLossless, RLELossless

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NEEDLES = (*PATIENT_NAME.lower().split("^"), PATIENT_ID.lower(), PATIENT_ID.split("-")[-1],
           BIRTH_DATE)
"""Family and given name, the id and its digits, the birth date: each alone is a leak."""


class RedisMonitor:
    """Every command the Redis server executes, as MONITOR reports it, until ``stop``."""

    def __init__(self, port: int):
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._sock.settimeout(0.2)
        self._data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self._data += chunk

    def stop(self) -> str:
        """The traffic as text, with every base64 token (message bodies) decoded beside it."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        text = self._data.decode("utf-8", errors="replace")
        decoded = []
        for token in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
            try:
                decoded.append(base64.b64decode(token + "=" * (-len(token) % 4))
                               .decode("utf-8", errors="replace"))
            except (binascii.Error, ValueError):
                continue
        return text + "\n".join(decoded)


def test_dicom_results_carry_identifiers_and_patient_data_goes_nowhere(tmp_path):
    other_uid = UIDS["SOPInstanceUID"] + ".9"
    frontal = to_bytes(make_ds(texture(12), JPEGLSLossless, bits_stored=12))
    files = {
        "IM-0001.dcm": frontal,
        "IM-0001-again.dcm": frontal,
        "IM-0002": to_bytes(make_ds(texture(12), RLELossless, bits_stored=12,
                                    PhotometricInterpretation="MONOCHROME1",
                                    SOPInstanceUID=UIDS["SOPInstanceUID"] + ".2")),
        "IM-0003.dcm": to_bytes(make_ds(texture(16), ExplicitVRBigEndian, Modality="DX",
                                        SOPInstanceUID=other_uid, ViewPosition="AP")),
        "IM-0004.dcm": to_bytes(make_ds(texture(8), ViewPosition="LL",
                                        SOPInstanceUID=UIDS["SOPInstanceUID"] + ".4")),
    }
    with pipeline_session(tmp_path, start=False) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        register_tiny_bundle(p.db_url, p.models_dir, "infection")
        monitor = RedisMonitor(p.redis.port)
        try:
            p.start_worker()
            p.start_watcher()
            for name, data in files.items():
                drop(p.inbox, name, data)
            rows = p.wait_final(list(files), timeout=150)
            predictions = p.count("SELECT COUNT(*) FROM predictions")
        finally:
            p.stop_watcher()
            p.stop_worker()
            traffic = monitor.stop().lower()
        logs = (p.log("worker") + p.log("watcher")).lower()

    assert {n: rows[n]["status"] for n in files} == {
        "IM-0001.dcm": "done", "IM-0001-again.dcm": "done", "IM-0002": "done",
        "IM-0003.dcm": "done", "IM-0004.dcm": "rejected"}
    assert predictions == 3  # the same content twice is one prediction
    assert rows["IM-0001.dcm"]["label"] == rows["IM-0001-again.dcm"]["label"]
    for name in ("IM-0001.dcm", "IM-0001-again.dcm"):
        row = rows[name]
        assert (row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"],
                row["accession_number"], row["modality"], row["view_position"]) == (
            UIDS["StudyInstanceUID"], UIDS["SeriesInstanceUID"], UIDS["SOPInstanceUID"],
            "ACC-0042", "CR", "PA")
    assert (rows["IM-0003.dcm"]["sop_instance_uid"], rows["IM-0003.dcm"]["modality"],
            rows["IM-0003.dcm"]["view_position"]) == (other_uid, "DX", "AP")
    assert rows["IM-0004.dcm"]["error"].startswith("lateral view (ViewPosition LL)")
    assert rows["IM-0004.dcm"]["view_position"] == "LL"

    database = b"".join(path.read_bytes() for path in tmp_path.glob("cxr.db*")).lower()
    # Each haystack demonstrably holds what the pipeline wrote, so a search can fail.
    assert b"acc-0042" in database and UIDS["StudyInstanceUID"].encode() in database
    assert "im-0002" in logs and "lateral view" in logs
    assert "im-0003.dcm" in traffic and '"chord": null' in traffic  # bodies decoded too
    for needle in NEEDLES:
        assert needle.encode() not in database, needle
        assert needle not in logs, needle
        assert needle not in traffic, needle
