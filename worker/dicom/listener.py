"""``cxr dicom listen``: a Storage SCP (CR, DX, Secondary Capture, and C-ECHO) feeding the inbox.

The C-STORE handler only puts the instance safely into the inbox and answers: the bytes as the
caller sent them go to a hidden temporary name in the inbox (the watcher skips dotfiles), are
flushed to disk, and are renamed to their final name, so the watcher sees complete files only.
Everything after that (checks, identifiers, the queue) is the inbox's existing path. Each
association runs on its own thread (pynetdicom), so a slow caller holds only its own; the
limits on associations, PDU size, instance size and silence all live in ``build_ae``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from db.exceptions import CxrError
from worker.dicom.peers import Caller, caller_allowed, is_loopback, parse_callers
from worker.settings import Settings

log = logging.getLogger(__name__)

STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                   DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""C-STORE "Refused: Out of Resources": the instance is not safely on disk; the caller retries."""
TEMP_PREFIX = ".dicom-"


@dataclass
class ListenerConfig:
    inbox: Path
    port: int
    address: str = "127.0.0.1"
    ae_title: str = "CXR"
    callers: list[Caller] = field(default_factory=list)
    max_associations: int = 8
    max_pdu_bytes: int = 262144
    max_instance_bytes: int = 512 * 1024 * 1024
    timeout_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ListenerConfig:
        if settings.dicom_port is None:
            raise CxrError("set CXR_DICOM_PORT to the port the DICOM listener should use")
        return cls(
            inbox=settings.inbox_dir, port=settings.dicom_port, address=settings.dicom_address,
            ae_title=settings.dicom_ae_title, callers=parse_callers(settings.dicom_allowed),
            max_associations=settings.dicom_max_associations,
            max_pdu_bytes=settings.dicom_max_pdu_bytes,
            max_instance_bytes=settings.dicom_max_instance_bytes or settings.max_file_bytes,
            timeout_seconds=settings.dicom_timeout_seconds,
        )

    def check(self) -> None:
        """Refuse to listen beyond loopback with no list of allowed callers."""
        if not self.callers and not is_loopback(self.address):
            raise CxrError(f"the DICOM listener would accept any caller on {self.address}; "
                           "set CXR_DICOM_ALLOWED (AE titles, optionally AE@host) or keep "
                           "CXR_DICOM_ADDRESS on loopback")


def write_instance(inbox: Path, data: bytes) -> Path:
    """Put ``data`` into ``inbox`` under a new name, complete or not at all: a hidden temporary
    file, flushed to disk, renamed into place, the folder flushed too."""
    name = uuid.uuid4().hex
    temp = inbox / f"{TEMP_PREFIX}{name}.part"
    final = inbox / f"{name}.dcm"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.rename(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


class _Handlers:
    """The event handlers of one listener: who may call, how much one instance may be, where
    it goes. Called on each association's own thread."""

    def __init__(self, config: ListenerConfig):
        self.config = config
        self.received = 0
        self._pending: dict[int, int] = {}  # association id -> bytes since its last request
        self._lock = threading.Lock()

    def bindings(self) -> list:
        return [(evt.EVT_CONN_OPEN, self.on_connected),
                (evt.EVT_ESTABLISHED, self.on_established), (evt.EVT_C_ECHO, self.on_echo),
                (evt.EVT_C_STORE, self.on_store), (evt.EVT_DATA_RECV, self.on_data),
                (evt.EVT_RELEASED, self.on_closed), (evt.EVT_ABORTED, self.on_closed)]

    def on_connected(self, event) -> None:
        """Bound every read and write: pynetdicom waits for the rest of a PDU without a
        deadline, so a caller that sends half a PDU and stalls would hold its thread forever."""
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.settimeout(self.config.timeout_seconds)

    def on_established(self, event) -> None:
        requestor = event.assoc.requestor
        if not caller_allowed(self.config.callers, requestor.ae_title, requestor.address):
            log.warning("refused DICOM caller %r from %s: not in CXR_DICOM_ALLOWED",
                        requestor.ae_title, requestor.address)
            event.assoc.abort()

    def on_data(self, event) -> None:
        """Count what arrives between two requests; past the instance limit, drop the
        association (from another thread: this one is the reader an abort waits for)."""
        key = id(event.assoc)
        with self._lock:
            total = self._pending.get(key, 0) + len(event.data)
            self._pending[key] = total
        if total > self.config.max_instance_bytes + self.config.max_pdu_bytes:
            log.warning("DICOM caller %r sent more than %d bytes in one instance; dropping it",
                        event.assoc.requestor.ae_title, self.config.max_instance_bytes)
            with self._lock:
                self._pending[key] = -(1 << 62)  # abort once
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    def on_closed(self, event) -> None:
        with self._lock:
            self._pending.pop(id(event.assoc), None)

    def _reset(self, event) -> None:
        with self._lock:
            if self._pending.get(id(event.assoc), 0) >= 0:
                self._pending[id(event.assoc)] = 0

    def on_echo(self, event) -> int:
        self._reset(event)
        return SUCCESS

    def on_store(self, event) -> int:
        self._reset(event)
        try:
            data = event.encoded_dataset(include_meta=True)
            if len(data) > self.config.max_instance_bytes:
                log.warning("refused a DICOM instance of %d bytes (limit %d)", len(data),
                            self.config.max_instance_bytes)
                return OUT_OF_RESOURCES
            write_instance(self.config.inbox, data)
        except Exception as exc:
            log.error("could not store a DICOM instance from %r: %s", event.assoc.requestor.
                      ae_title, type(exc).__name__ if not isinstance(exc, OSError)
                      else exc.strerror)
            return OUT_OF_RESOURCES
        self.received += 1
        return SUCCESS


def build_ae(config: ListenerConfig) -> AE:
    """The application entity with every bound in one place."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_bytes
    ae.acse_timeout = ae.dimse_timeout = config.timeout_seconds
    ae.network_timeout = config.timeout_seconds
    ae.require_called_aet = True
    titles = sorted({c.ae_title for c in config.callers})
    if titles:
        ae.require_calling_aet = titles
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


class Listener:
    """A running Storage SCP; ``close()`` stops it (associations in flight finish first)."""

    def __init__(self, config: ListenerConfig):
        config.check()
        config.inbox.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.handlers = _Handlers(config)
        self.ae = build_ae(config)
        self.server = self.ae.start_server((config.address, config.port), block=False,
                                           evt_handlers=self.handlers.bindings())

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()


def quiet_pynetdicom() -> None:
    """pynetdicom logs every request at INFO; the listener says what matters itself."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def listen(settings: Settings, stop: threading.Event | None = None) -> int:
    """Serve until ``stop`` is set (or SIGTERM/Ctrl-C reaches the caller)."""
    quiet_pynetdicom()
    config = ListenerConfig.from_settings(settings)
    listener = Listener(config)
    log.info("DICOM listener %s on %s:%d into %s", config.ae_title, config.address,
             listener.port, config.inbox)
    stop = stop or threading.Event()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        listener.close()
    return 0
