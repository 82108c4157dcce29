"""The calling side: C-ECHO a peer, C-STORE data sets to it. Every call has a deadline."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from worker.dicom.peers import Destination

TIMEOUT_SECONDS = 30.0


class SendError(Exception):
    """A peer could not be reached or did not take an object; the message says why."""


def _ae(ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def echo(peer: Destination, ae_title: str = "CXR", timeout: float = TIMEOUT_SECONDS) -> None:
    """C-ECHO ``peer``; raises ``SendError`` saying what failed."""
    ae = _ae(ae_title, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise SendError(f"{peer}: {_why_not(assoc)}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != 0:
        raise SendError(f"{peer}: C-ECHO answered {_status(status)}")


def store(peer: Destination, datasets: Sequence[Dataset], ae_title: str = "CXR",
          timeout: float = TIMEOUT_SECONDS) -> None:
    """C-STORE every data set to ``peer`` in one association; raises ``SendError`` unless the
    peer answered success (or a warning) for each."""
    ae = _ae(ae_title, timeout)
    for sop_class, syntax in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                                     for d in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise SendError(f"{peer}: {_why_not(assoc)}")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or not (code == 0 or 0xB000 <= code <= 0xBFFF):
                raise SendError(f"{peer}: C-STORE answered {_status(status)}")
    finally:
        if assoc.is_established:
            assoc.release()


def _why_not(assoc) -> str:
    if assoc.is_rejected:
        return "association rejected (check the AE titles and the peer's allowed callers)"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "no association (nothing answers, or it timed out)"


def _status(status) -> str:
    code = getattr(status, "Status", None)
    return "nothing (timeout or lost connection)" if code is None else f"status 0x{code:04X}"
