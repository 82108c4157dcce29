"""The C-STORE listener on loopback, spoken to by dcmtk (storescu, echoscu) and pynetdicom:
instances land in the inbox complete, callers are limited, a slow caller holds only its own
association, and an instance not safely on disk is never answered "success"."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from helpers_dicom import make_ds, save, texture, to_bytes
from helpers_orthanc import need_dcmtk_and_orthanc
from helpers_pipeline import wait_until
from pydicom import dcmread

from db.exceptions import CxrError
from worker.dicom.listener import Listener, ListenerConfig
from worker.dicom.peers import Caller, Destination, caller_allowed, parse_destinations
from worker.dicom.scu import SendError, echo, store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def listener_for(tmp_path):
    need_dcmtk_and_orthanc()
    started = []

    def start(**kwargs) -> Listener:
        listener = Listener(ListenerConfig(inbox=tmp_path / "inbox", port=0, **kwargs))
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.close()


def _storescu(port: int, files, calling: str = "STORESCU") -> int:
    argv = ["storescu", "-aet", calling, "-aec", "CXR", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def _echoscu(port: int, calling: str = "ECHOSCU") -> int:
    argv = ["echoscu", "-aet", calling, "-aec", "CXR", "127.0.0.1", str(port)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def _instance(tmp_path: Path, sop: str = "1.2.826.0.1.3680043.8.498.7") -> Path:
    return save(make_ds(texture(16), SOPInstanceUID=sop), tmp_path / f"{sop}.dcm")


def test_storescu_instances_land_in_the_inbox_complete(tmp_path, listener_for):
    listener = listener_for()
    files = [_instance(tmp_path, f"1.2.826.0.1.3680043.8.498.7.{i}") for i in range(3)]
    assert _echoscu(listener.port) == 0
    assert _storescu(listener.port, files) == 0
    landed = sorted((tmp_path / "inbox").iterdir())
    assert [p.suffix for p in landed] == [".dcm"] * 3  # no temporary name left behind
    assert sorted(dcmread(p).SOPInstanceUID for p in landed) == sorted(
        dcmread(f).SOPInstanceUID for f in files)
    assert (dcmread(landed[0]).pixel_array == dcmread(files[0]).pixel_array).all()


def test_a_caller_not_in_the_allowed_list_is_refused(tmp_path, listener_for):
    listener = listener_for(callers=[Caller("MODALITY"), Caller("PACS", "192.0.2.7")])
    file = _instance(tmp_path)
    assert _storescu(listener.port, [file], calling="STRANGER") != 0
    assert _echoscu(listener.port, calling="STRANGER") != 0
    with pytest.raises(SendError):  # the right title from the wrong host
        echo(Destination("CXR", "127.0.0.1", listener.port), ae_title="PACS")
    assert not list((tmp_path / "inbox").iterdir())
    wrong_called = ["storescu", "-aet", "MODALITY", "-aec", "NOT_CXR", "127.0.0.1",
                    str(listener.port), str(file)]
    assert subprocess.run(wrong_called, capture_output=True, timeout=30).returncode != 0
    assert not list((tmp_path / "inbox").iterdir())
    assert _storescu(listener.port, [file], calling="MODALITY") == 0
    assert len(list((tmp_path / "inbox").iterdir())) == 1


def test_no_list_means_loopback_only():
    with pytest.raises(CxrError, match="CXR_DICOM_ALLOWED"):
        ListenerConfig(inbox=Path("unused"), port=0, address="0.0.0.0").check()
    ListenerConfig(inbox=Path("unused"), port=0, address="0.0.0.0",
                   callers=[Caller("PACS")]).check()
    assert caller_allowed([], "ANY", "127.0.0.1")
    assert not caller_allowed([], "ANY", "192.0.2.7")
    assert parse_destinations("PACS@pacs.example:104, B@[::1]:11112") == [
        Destination("PACS", "pacs.example", 104), Destination("B", "::1", 11112)]
    with pytest.raises(CxrError):
        parse_destinations("PACS@host")


def test_a_slow_caller_does_not_block_an_echo_or_another_caller(tmp_path, listener_for):
    listener = listener_for(timeout_seconds=3.0)
    stalled = socket.create_connection(("127.0.0.1", listener.port))
    stalled.sendall(b"\x01\x00\x00\x00\x00\xcd\x00\x01")  # half an A-ASSOCIATE-RQ, then nothing
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    idle_ae = AE(ae_title="IDLE")
    idle_ae.add_requested_context(Verification)
    idle = idle_ae.associate("127.0.0.1", listener.port, ae_title="CXR")
    assert idle.is_established  # and then it sends nothing
    try:
        assert _echoscu(listener.port) == 0
        assert _storescu(listener.port, [_instance(tmp_path)]) == 0
        stalled.settimeout(30)
        assert stalled.recv(1024) == b""  # the half-sent PDU does not hold a thread for ever
        wait_until(lambda: not idle.is_alive(), 30, "the idle association to be dropped")
    finally:
        stalled.close()
        idle.abort()
    assert len(list((tmp_path / "inbox").iterdir())) == 1


def test_a_failed_write_answers_failure_never_success(tmp_path, listener_for):
    listener = listener_for()
    inbox = tmp_path / "inbox"
    inbox.rmdir()
    inbox.write_text("not a folder")  # every write into it fails
    ds = make_ds(texture(16))
    with pytest.raises(SendError, match="0xA700"):
        store(Destination("CXR", "127.0.0.1", listener.port), [ds])


def test_an_instance_over_the_size_limit_is_dropped(tmp_path, listener_for):
    listener = listener_for(max_instance_bytes=2048, max_pdu_bytes=4096)
    ds = make_ds(texture(16))
    assert len(to_bytes(ds)) > 8192
    with pytest.raises(SendError):
        store(Destination("CXR", "127.0.0.1", listener.port), [ds])
    assert not list((tmp_path / "inbox").iterdir())
    assert _echoscu(listener.port) == 0  # the listener itself carries on


def test_cxr_up_runs_the_listener_and_sender_only_when_set(tmp_path):
    from worker.ops.supervisor import child_specs
    from worker.settings import Settings

    def names(**kwargs) -> list[str]:
        settings = Settings(_env_file=None, data_dir=tmp_path, **kwargs)
        return [s.name for s in child_specs(settings, flower=False)]

    assert names() == ["watcher", "worker"]
    assert names(dicom_port=11112) == ["watcher", "worker", "dicom-listener"]
    assert names(dicom_destinations="PACS@pacs:104") == ["watcher", "worker", "dicom-sender"]
    assert names(dicom_export_dir=tmp_path / "out")[-1] == "dicom-sender"


def test_associations_beyond_the_limit_are_refused_as_busy(tmp_path, listener_for):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    listener = listener_for(max_associations=1)
    holder_ae = AE(ae_title="HOLDER")
    holder_ae.add_requested_context(Verification)
    holder = holder_ae.associate("127.0.0.1", listener.port, ae_title="CXR")
    assert holder.is_established
    try:
        assert _echoscu(listener.port) != 0  # rejected: local limit exceeded
    finally:
        holder.release()
    wait_until(lambda: _echoscu(listener.port) == 0, 10, "the freed slot to take an echo")
