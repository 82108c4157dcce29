"""A private Orthanc PACS for the DICOM network tests: its own storage folder, DICOM and HTTP
ports on loopback, its modalities pointing wherever the test says; stopped and started at will
(the data stays), read back through its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers_pipeline import free_port, stop_process, wait_until

AE_TITLE = "ORTHANC"


def need_dcmtk_and_orthanc() -> None:
    missing = [tool for tool in ("Orthanc", "storescu", "echoscu") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; `make test` installs them "
                    "(.ci/pacs.sh: apt-get install orthanc dcmtk)")


class Orthanc:
    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]]):
        need_dcmtk_and_orthanc()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = self.workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "cxr-test", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {k: list(v) for k, v in modalities.items()},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
            "HttpServerEnabled": True, "DicomScuTimeout": 10, "StorageCompression": False,
        }))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.workdir)
        log.close()

        def up() -> bool:
            try:
                self.get("/system")
                return True
            except OSError:
                return False

        wait_until(up, 30, "Orthanc to answer")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            body = rsp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes | dict, raw: bool = False):
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            out = rsp.read()
        return out if raw else json.loads(out or b"null")

    def upload(self, dicom: bytes) -> str:
        """Store a DICOM file in Orthanc; its Orthanc instance id."""
        return self.post("/instances", dicom)["ID"]

    def instances_of(self, sop_class: str) -> list[bytes]:
        """Every instance Orthanc holds of ``sop_class``, as DICOM file bytes."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPClassUID": sop_class}})
        return [self.get(f"/instances/{oid}/file") for oid in found]

    def log(self) -> str:
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""
