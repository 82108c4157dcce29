"""The DICOM network end to end on loopback, with real DICOM software: dcmtk's storescu and an
Orthanc PACS send images to `cxr dicom listen`; the watcher and a Celery worker classify them;
`cxr dicom send` returns each result to Orthanc as an SR (and the heatmap as a Secondary
Capture) in the source study, read back through Orthanc's REST API. Orthanc down, and the
sender restarted, cost a delay and nothing else: the outbox drains when Orthanc is back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers_dicom import PATIENT_ID, PATIENT_NAME, make_ds, save, texture, to_bytes
from helpers_models import register_tiny_bundle
from helpers_orthanc import AE_TITLE, Orthanc
from helpers_pipeline import (
    CXR_COMMAND,
    ROOT,
    free_port,
    pipeline_session,
    postgres_schema,
    stop_process,
    wait_until,
)
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from db.vocabulary import DISCLAIMER
from worker.dicom.peers import Destination
from worker.dicom.scu import SendError, echo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STUDY = "1.2.826.0.1.3680043.8.498.50"


def _source(n: int, **attrs):
    uids = {"StudyInstanceUID": f"{STUDY}.{n}", "SeriesInstanceUID": f"{STUDY}.{n}.1",
            "SOPInstanceUID": f"{STUDY}.{n}.1.1"}
    return make_ds(texture(16), **{**uids, **attrs})


def _start(p, name: str, argv: list[str], env: dict) -> subprocess.Popen:
    log = open(p.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([*CXR_COMMAND, *argv], env={**p.env, **env}, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def _echo_ok(port: int) -> bool:
    try:
        echo(Destination("CXR", "127.0.0.1", port), "ECHOSCU", timeout=2)
        return True
    except SendError:
        return False


def _by_sop(p, sops) -> dict[str, dict]:
    rows = {r["sop_instance_uid"]: r for r in p.rows().values()}
    return {s: rows[s] for s in sops if s in rows}


def _wait_final(p, sops, timeout=150) -> dict[str, dict]:
    def ready():
        rows = _by_sop(p, sops)
        ok = len(rows) == len(sops) and all(r["status"] in ("done", "rejected")
                                            for r in rows.values())
        return rows if ok else None

    try:
        return wait_until(ready, timeout, "the DICOM rows to be final")
    except AssertionError:
        p.dump()
        print(p.log("listener"), p.log("sender"))
        raise


def _content(sr) -> dict[str, object]:
    """The SR's items by concept meaning (several of one meaning make a list)."""
    out: dict[str, list] = {}
    for item in sr.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "IMAGE":
            value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        else:
            value = item.TextValue
        out.setdefault(meaning, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def _srs(orthanc: Orthanc) -> dict[str, object]:
    """Orthanc's SRs by the source instance each references."""
    found = {}
    for data in orthanc.instances_of(ComprehensiveSRStorage):
        sr = dcmread(__import__("io").BytesIO(data))
        found[_content(sr)["Source of Measurement"]] = sr
    return found


def test_storescu_and_orthanc_in_sr_and_heatmap_back_to_the_study(tmp_path):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"cxr": ("CXR", "127.0.0.1", port)})
    orthanc.start()
    export_dir = tmp_path / "export"
    env = {"CXR_DICOM_PORT": str(port), "CXR_HEATMAPS": "true",
           "CXR_DICOM_DESTINATIONS": f"{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}",
           "CXR_DICOM_EXPORT_DIR": str(export_dir), "CXR_DICOM_SEND_HEATMAPS": "true"}
    pushed, from_pacs = _source(1), _source(2, Modality="DX")
    lateral = _source(3, ViewPosition="LL")
    sops = [str(ds.SOPInstanceUID) for ds in (pushed, from_pacs, lateral)]
    with pipeline_session(tmp_path / "p", start=False, env=env) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia", conv=True, bias=30.0)
        register_tiny_bundle(p.db_url, p.models_dir, "infection", conv=True)
        p.start_worker()
        p.start_watcher()
        listener = _start(p, "listener", ["dicom", "listen"], {})
        sender = _start(p, "sender", ["dicom", "send"], {})
        try:
            wait_until(lambda: _echo_ok(port), 30, "the listener to answer")
            files = [save(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate((pushed, lateral))]
            run = subprocess.run(["storescu", "-aec", "CXR", "127.0.0.1", str(port), *map(
                str, files)], capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, run.stderr
            oid = orthanc.upload(to_bytes(from_pacs))
            orthanc.post("/modalities/cxr/store", {"Resources": [oid], "Synchronous": True})
            rows = _wait_final(p, sops)
            srs = wait_until(lambda: (lambda f: f if len(f) == 3 else None)(_srs(orthanc)),
                             60, "three SRs in Orthanc")
            scs = wait_until(lambda: (lambda f: f if len(f) == 2 else None)(
                orthanc.instances_of(SecondaryCaptureImageStorage)), 30, "two heatmaps in Orthanc")
            shown = subprocess.run([*CXR_COMMAND, "dicom", "outbox"], env=p.env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60).stdout
        finally:
            stop_process(sender)
            stop_process(listener)
            orthanc.stop()
        logs = p.log("listener") + p.log("sender") + p.log("watcher")
    assert "sent" in logs.lower()  # the logs were written, and hold no patient data
    assert PATIENT_NAME.split("^")[0] not in logs and PATIENT_ID not in logs
    assert [rows[s]["status"] for s in sops] == ["done", "done", "rejected"]
    for source, sop in zip((pushed, from_pacs, lateral), sops, strict=True):
        sr, row = srs[sop], rows[sop]
        items = _content(sr)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.PatientID == PATIENT_ID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
            .ReferencedSOPInstanceUID == sop
        assert items["Comment"] == DISCLAIMER
        if row["status"] == "done":
            assert items["Finding"] == {"VIRUS": "Viral pneumonia",
                                        "BACTERIA": "Bacterial pneumonia"}[row["label"]]
            assert items["Probability of pneumonia"] == pytest.approx(row["p_pneumonia"], 1e-5)
            assert items["Probability of viral pneumonia given pneumonia"] == pytest.approx(
                row["p_virus"], abs=1e-5)
            assert items["Algorithm Version"] == [f"pneumonia/v{row['pneumonia_model']}",
                                                  f"infection/v{row['infection_model']}"]
        else:
            assert items["Finding"].startswith("refused: lateral view")
    sc = dcmread(__import__("io").BytesIO(scs[0]))
    assert sc.StudyInstanceUID in {pushed.StudyInstanceUID, from_pacs.StudyInstanceUID}
    assert sc.SeriesInstanceUID not in {pushed.SeriesInstanceUID, from_pacs.SeriesInstanceUID}
    assert sc.pixel_array.shape[-1] == 3
    exported = sorted(Path(export_dir).rglob("*.dcm"))
    assert len(exported) == 5  # three SRs, two heatmaps, also in the export folder
    assert "sent" in shown and "failing" not in shown


def _outbox(p) -> dict[str, int]:
    return {state: p.count(sql) for state, sql in (
        ("sent", "SELECT COUNT(*) FROM dicom_outbox WHERE sent_at IS NOT NULL"),
        ("failing", "SELECT COUNT(*) FROM dicom_outbox WHERE sent_at IS NULL AND attempts > 0"),
        ("all", "SELECT COUNT(*) FROM dicom_outbox"))}


def test_orthanc_down_and_a_sender_restart_lose_nothing(tmp_path):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"cxr": ("CXR", "127.0.0.1", port)})
    env = {"CXR_DICOM_PORT": str(port), "CXR_DICOM_RETRY_MAX_SECONDS": "1",
           "CXR_DICOM_DESTINATIONS": f"{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}"}
    sources = [_source(10 + i) for i in range(3)]
    sops = [str(ds.SOPInstanceUID) for ds in sources]
    with postgres_schema() as (_, db_url), pipeline_session(tmp_path / "p", db_url,
                                                             start=False, env=env) as p:
        register_tiny_bundle(p.db_url, p.models_dir, "pneumonia")
        p.start_worker()
        p.start_watcher()
        listener = _start(p, "listener", ["dicom", "listen"], {})
        sender = _start(p, "sender", ["dicom", "send"], {})
        try:
            wait_until(lambda: _echo_ok(port), 30, "the listener to answer")
            files = [save(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(sources)]
            subprocess.run(["storescu", "-aec", "CXR", "127.0.0.1", str(port), *map(str, files)],
                           check=True, capture_output=True, timeout=30)
            _wait_final(p, sops)
            wait_until(lambda: _outbox(p)["failing"] == 3, 60, "three failing rows")
            stop_process(sender)  # the sender goes too; its replacement finds the rows
            failing = subprocess.run([*CXR_COMMAND, "dicom", "outbox", "--state", "failing"],
                                     env=p.env, cwd=ROOT, capture_output=True, text=True,
                                     timeout=60).stdout
            orthanc.start()
            sender = _start(p, "sender", ["dicom", "send"], {})
            wait_until(lambda: _outbox(p)["sent"] == 3, 60, "the outbox to drain")
            srs = wait_until(lambda: (lambda f: f if len(f) == 3 else None)(_srs(orthanc)),
                             30, "three SRs in Orthanc")
            outbox = _outbox(p)
        finally:
            stop_process(sender)
            stop_process(listener)
            orthanc.stop()
    assert "association" in failing and f"127.0.0.1:{orthanc.dicom_port}" in failing
    assert outbox == {"sent": 3, "failing": 0, "all": 3}
    assert sorted(srs) == sorted(sops)
