"""``cxr bench --dicom N``: runs end to end (storescu, listener, watcher) and reports rates;
no wall-clock assertion, only that each instance was sent, recorded and counted."""

from __future__ import annotations

import json

import pytest
from helpers_orthanc import need_dcmtk_and_orthanc
from helpers_pipeline import shared_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_cxr_bench_dicom_sends_and_records_every_instance(tmp_path, monkeypatch, capsys):
    from worker.cli import main

    need_dcmtk_and_orthanc()
    shared_redis(12).close()
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:6379/0")
    out = tmp_path / "bench.json"
    code = main(["bench", "--dicom", "6", "--associations", "2", "--redis-db", "12",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    assert "2 association(s): storescu answered for all" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["instances"] == 6 and result["associations"] == 2
    assert result["recorded_per_s"] > 0 and result["stored_per_s"] >= result["recorded_per_s"]
    archived = list((tmp_path / "work" / "var" / "archive").rglob("*.dcm"))
    assert len(archived) == 6  # every instance taken by the watcher, nothing left in the inbox
    assert not list((tmp_path / "work" / "var" / "inbox").iterdir())
