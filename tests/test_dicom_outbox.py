"""The outbox's queries on SQLite and PostgreSQL (which finished images owe which destination
what; due, failed and sent rows) and the DICOM objects the sender builds, read back."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from helpers_dicom import PATIENT_ID, make_ds, texture, to_bytes
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from db.models import DicomOutbox, Image, ModelVersion, Prediction, utcnow
from db.outbox import due_items, fill_outbox, mark_failed, mark_sent, outbox_rows
from db.session import session_scope
from db.vocabulary import DISCLAIMER
from worker.dicom.reports import heatmap_sc, result_sr
from worker.dicom.sender import SenderConfig, export, pass_once, retry_delay, stand_in_source

DEST = "PACS@127.0.0.1:104"


def _images(db_url: str) -> dict[str, int]:
    """One image per case: a DICOM done with a heatmap, a DICOM refused, a DICOM failed, a
    JPEG done, and a DICOM still queued."""
    with session_scope(db_url) as s:
        model = ModelVersion(stage="pneumonia", version=1, backbone="tiny", bundle_path="x")
        s.add(model)
        s.flush()
        with_map = Prediction(sha256="a" * 64, pneumonia_model_id=model.id, p_pneumonia=0.9,
                              label="PNEUMONIA", threshold=0.5, heatmap_path="heatmaps/a.png")
        s.add(with_map)
        s.flush()
        rows = {
            "dicom_done": Image(sha256="a" * 64, file_name="a.dcm", status="done",
                                sop_instance_uid="1.2.3.1", prediction_id=with_map.id),
            "dicom_refused": Image(sha256="b" * 64, file_name="b.dcm", status="rejected",
                                   sop_instance_uid="1.2.3.2", error="lateral view"),
            "dicom_failed": Image(sha256="c" * 64, file_name="c.dcm", status="failed",
                                  sop_instance_uid="1.2.3.3"),
            "jpeg_done": Image(sha256="d" * 64, file_name="d.jpeg", status="done"),
            "dicom_queued": Image(sha256="e" * 64, file_name="e.dcm", status="queued",
                                  sop_instance_uid="1.2.3.5"),
        }
        s.add_all(rows.values())
        s.flush()
        return {name: row.id for name, row in rows.items()}


def _owed(db_url: str) -> set[tuple[int, str, str]]:
    with session_scope(db_url) as s:
        return {(r.image_id, r.kind, r.destination) for r in s.query(DicomOutbox)}


def test_finished_dicom_images_owe_each_destination_a_result(db_url):
    ids = _images(db_url)
    with session_scope(db_url) as s:
        assert fill_outbox(s, [DEST, "export"], ["sr", "sc"]) == 6
    with session_scope(db_url) as s:
        assert fill_outbox(s, [DEST, "export"], ["sr", "sc"]) == 0  # once each
    done, refused = ids["dicom_done"], ids["dicom_refused"]
    assert _owed(db_url) == {(done, "sr", DEST), (done, "sc", DEST), (refused, "sr", DEST),
                             (done, "sr", "export"), (done, "sc", "export"),
                             (refused, "sr", "export")}
    with session_scope(db_url) as s:
        assert fill_outbox(s, [DEST], ["sr"], dicom_only=False) == 1  # the JPEG too
        assert {i.destination for i in due_items(s, ["export"])} == {"export"}


def test_a_failed_try_waits_and_says_why_then_is_sent(db_url):
    _images(db_url)
    with session_scope(db_url) as s:
        fill_outbox(s, [DEST], ["sr"])
        items = due_items(s, [DEST])
        mark_failed(s, [items[0].id], "PACS@127.0.0.1:104: association rejected", 60)
        mark_sent(s, [items[1].id])
    with session_scope(db_url) as s:
        assert due_items(s, [DEST]) == []
        assert [i.id for i in due_items(s, [DEST], now=utcnow() + timedelta(seconds=61))] == [
            items[0].id]
        rows = {r["id"]: r for r in outbox_rows(s)}
        failing = outbox_rows(s, state="failing")
    assert rows[items[0].id]["state"] == "failing" and rows[items[0].id]["attempts"] == 1
    assert "association rejected" in rows[items[0].id]["last_error"]
    assert rows[items[1].id]["state"] == "sent" and rows[items[1].id]["next_try_at"] is None
    assert [r["id"] for r in failing] == [items[0].id]
    assert [retry_delay(n, 300) for n in (0, 1, 5, 20)] == [1, 2, 32, 300]


def _read(ds):
    return dcmread(DicomBytesIO(to_bytes(ds)))


def test_the_sr_of_a_refusal_and_a_review_flag_reads_back():
    source = make_ds(texture(16), PatientSex=None, StudyDate=None)  # type 2 left out
    sr = _read(result_sr(source, {"label": None, "status": "rejected", "error": "lateral view",
                                  "review": "out_of_scope", "p_pneumonia": None,
                                  "pneumonia_model": None}, "1.2.826.0.1.3680043.8.498.99"))
    texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
    assert texts == ["refused: lateral view", "review: out_of_scope", DISCLAIMER]
    assert not [i for i in sr.ContentSequence if i.ValueType == "NUM"]
    assert sr.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.99"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == PATIENT_ID
    assert sr.PatientSex == "" and "PixelData" not in sr


def test_the_heatmap_sc_reads_back_in_the_study_in_its_own_series():
    source = make_ds(texture(16))
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[..., 0] = 200
    sc = _read(heatmap_sc(source, rgb, "1.2.826.0.1.3680043.8.498.98"))
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.PatientID == PATIENT_ID and sc.ImageComments == DISCLAIMER
    assert (sc.pixel_array == rgb).all()


def test_a_jpeg_result_gets_a_study_of_its_own_the_same_every_try():
    one, again = stand_in_source(7, "d" * 64), stand_in_source(7, "d" * 64)
    assert one.StudyInstanceUID == again.StudyInstanceUID
    assert one.StudyInstanceUID != stand_in_source(8, "e" * 64).StudyInstanceUID
    sr = _read(result_sr(one, {"label": "NORMAL", "p_pneumonia": 0.1, "pneumonia_model": 1},
                         "1.2.826.0.1.3680043.8.498.97"))
    assert sr.StudyInstanceUID == one.StudyInstanceUID


def test_export_writes_complete_files_per_study(tmp_path):
    sr = result_sr(make_ds(texture(16)), {"label": "NORMAL", "p_pneumonia": 0.1},
                   "1.2.826.0.1.3680043.8.498.96")
    export(tmp_path, [sr])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["1.2.826.0.1.3680043.8.498.96.dcm"]
    assert files[0].parent.name == sr.StudyInstanceUID
    assert dcmread(files[0]).SOPInstanceUID == sr.SOPInstanceUID


def test_a_result_that_cannot_be_built_stays_failing_with_the_reason(db_url, tmp_path):
    ids = _images(db_url)  # no archived files: the DICOM sources cannot be read
    with session_scope(db_url) as s:
        s.query(Image).filter(Image.id == ids["dicom_refused"]).update(
            {"stored_path": "archive/gone.dcm"})
    config = SenderConfig(db_url, tmp_path, export_dir=tmp_path / "out")
    assert pass_once(config) == 0
    with session_scope(db_url) as s:
        rows = outbox_rows(s)
    assert {r["state"] for r in rows} == {"failing"} and len(rows) == 2
    assert sorted(r["last_error"] for r in rows) == [
        "FileNotFoundError: No such file or directory",
        "could not build the object: its archived file is not recorded"]
    assert not (tmp_path / "out").exists()  # nothing made up was exported


@pytest.mark.parametrize("kinds", [["sr"], ["sr", "sc"]])
def test_kinds_follow_the_heatmap_setting(kinds, tmp_path):
    config = SenderConfig("sqlite://", tmp_path, send_heatmaps=kinds == ["sr", "sc"])
    assert config.kinds == kinds and config.targets == []
