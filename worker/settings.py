"""The one settings object: every knob, read from ``CXR_*`` variables (and ``.env``).

Entry points (the CLI, the Celery app) read it once and pass it down; library code takes
plain values (paths, URLs) so it can be tested without the environment.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from db.exceptions import CxrError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CXR_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(
        Path("var"),
        description="Root for inbox/, archive/, rejected/, models/ and the SQLite file.",
    )
    inbox: Path | None = Field(
        None, description="Folder watched for new X-rays (default: DATA_DIR/inbox)."
    )
    models_dir: Path | None = Field(
        None, description="Where model bundles live (default: DATA_DIR/models)."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL (default: sqlite:///DATA_DIR/cxr.db).", repr=False
    )
    broker_url: str = Field(
        "redis://localhost:6379/0", description="Celery broker (Redis) URL; passwords allowed.",
        repr=False,
    )
    queue: str = Field("inference", description="Celery queue the inference tasks go to.")
    stable_seconds: float = Field(
        1.0, description="Quiet period (s) a file's size and mtime must hold before it is taken."
    )
    rescan_seconds: float = Field(
        30.0, description="Seconds between reconcile scans of the inbox and the database."
    )
    max_attempts: int = Field(3, description="Deliveries of one image before it is marked failed.")
    visibility_timeout: float = Field(
        3600.0, description="Seconds before Redis redelivers a task whose worker vanished unacked."
    )
    max_image_pixels: int = Field(
        60_000_000, description="Decoded pixel limit; larger images are rejected as bombs."
    )
    max_file_bytes: int = Field(
        512 * 1024 * 1024, description="Largest file (bytes) taken from the inbox; larger ones "
        "are rejected before they are read."
    )
    decode_memory_mb: int = Field(
        1024, description="Memory (MiB) one worker process may spend decoding a batch at once; "
        "large images wait for each other instead of all decoding in parallel."
    )
    unknown_view: Literal["accept", "reject"] = Field(
        "accept", description="A DICOM whose ViewPosition is neither frontal (PA, AP) nor "
        "lateral: `accept` reads it as frontal and says so in its row's error column, `reject` "
        "refuses it. An absent ViewPosition is read as frontal, like a JPEG."
    )
    hide_file_names: bool = Field(
        False, description="Keep file names (which often carry patient names) out of task "
        "arguments, Flower and logs: the image id only. The results table still has them."
    )
    batch_size: int = Field(
        16, description="Images per forward pass at most. The best size depends on the model "
        "and device (`cxr bench` prints the forward rate at each size)."
    )
    message_size: int = Field(
        128, description="Images per message at most (the watcher groups files that are complete "
        "at the same moment). The worker decodes a message's next images while the model runs "
        "on the ones before, so larger messages keep the model busier, and the work done once "
        "per message (claim, record, the hand-over to the next one: about 20 ms with the "
        "decoding threads idle) is spread over more images; each image still gets its own row, "
        "task id and attempts. A message redelivered after a crash runs its images one at a "
        "time."
    )
    claim_lease_seconds: float = Field(
        600.0, description="How long an image stays with the worker that claimed it before "
        "another worker may take it over (only matters if that worker hangs or its host dies)."
    )
    heatmaps: bool = Field(
        False, description="Workers write a Grad-CAM heatmap (DATA_DIR/heatmaps/, named in the "
        "results view) for every pneumonia-positive result: one more forward and backward "
        "pass per such image."
    )
    worker_concurrency: int = Field(
        1, description="Worker processes per `cxr worker` (one per GPU on GPU hosts)."
    )
    flower_address: str = Field("127.0.0.1", description="Address Flower listens on.")
    flower_port: int = Field(5555, description="Port Flower listens on.")
    flower_basic_auth: str | None = Field(
        None, description="user:password for Flower basic auth (off if unset).", repr=False
    )
    dicom_port: int | None = Field(
        None, description="Port of the DICOM C-STORE listener (`cxr dicom listen`, part of "
        "`cxr up`); unset: no listener."
    )
    dicom_address: str = Field(
        "127.0.0.1", description="Address the DICOM listener binds; beyond loopback only with "
        "CXR_DICOM_ALLOWED set."
    )
    dicom_ae_title: str = Field("CXR", description="This service's DICOM AE title.")
    dicom_allowed: str = Field(
        "", description="Calling AE titles allowed to send, comma separated, each optionally "
        "`AE@host`; empty: any caller, on loopback only."
    )
    dicom_max_associations: int = Field(
        8, description="DICOM associations served at once; more are refused (busy)."
    )
    dicom_max_pdu_bytes: int = Field(
        262144, description="Largest DICOM PDU (bytes) the listener accepts and offers."
    )
    dicom_max_instance_bytes: int | None = Field(
        None, description="Largest DICOM instance (bytes) received; a larger one aborts its "
        "association (default: CXR_MAX_FILE_BYTES)."
    )
    dicom_timeout_seconds: float = Field(
        30.0, description="Seconds a DICOM peer may stay silent (association set-up, messages, "
        "network) before its association is dropped."
    )
    dicom_destinations: str = Field(
        "", description="Where results go back as DICOM (SR, heatmap SC): `AE@host:port`, "
        "comma separated."
    )
    dicom_export_dir: Path | None = Field(
        None, description="Folder the DICOM results (SR, heatmap SC) are also written to."
    )
    dicom_send_heatmaps: bool = Field(
        False, description="Also send each result's heatmap (CXR_HEATMAPS) as a DICOM "
        "Secondary Capture in the source study, in a series of its own."
    )
    dicom_report_all: bool = Field(
        False, description="Make a DICOM SR for every finished image, JPEG and PNG too (each "
        "in a study of its own); default: DICOM images only."
    )
    dicom_retry_max_seconds: float = Field(
        300.0, description="Longest wait (s) between two tries to send one DICOM result."
    )
    web_address: str = Field("127.0.0.1", description="Address the review app (`cxr web`) "
                             "listens on; beyond loopback it needs users or a trusted header.")
    web_port: int = Field(8000, description="Port the review app listens on.")
    web_users: str | None = Field(
        None, description="Review app users as name:hash,... (hashes from `cxr web "
        "hash-password`).", repr=False
    )
    web_trusted_header: str | None = Field(
        None, description="Header a reverse proxy sets to the signed-in user's name (e.g. "
        "X-Forwarded-User); only for an app the proxy alone can reach."
    )
    web_secret: str | None = Field(
        None, description="Key that signs review app sessions (default: a random key kept in "
        "DATA_DIR/web-secret, mode 600).", repr=False
    )
    web_in_up: bool = Field(False, description="`cxr up` also runs the review app.")
    monitor_psi: float = Field(
        0.2, description="Population stability index past which `cxr monitor` flags a drift "
        "(and `--check` exits non-zero)."
    )
    metrics_port: int = Field(
        9464, description="Port of the Prometheus metrics `cxr up` and `cxr worker` serve "
        "(0: none)."
    )
    metrics_address: str = Field(
        "127.0.0.1", description="Address the Prometheus metrics listen on."
    )
    log_level: str = Field("INFO", description="Log level for all processes.")

    @cached_property
    def inbox_dir(self) -> Path:
        return (self.inbox or self.data_dir / "inbox").absolute()

    @cached_property
    def archive_dir(self) -> Path:
        return (self.data_dir / "archive").absolute()

    @cached_property
    def rejected_dir(self) -> Path:
        return (self.data_dir / "rejected").absolute()

    @cached_property
    def heatmaps_dir(self) -> Path:
        return (self.data_dir / "heatmaps").absolute()

    @cached_property
    def models_path(self) -> Path:
        return (self.models_dir or self.data_dir / "models").absolute()

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'cxr.db').absolute()}"

    def check_urls(self) -> None:
        """Refuse database and broker URLs whose passwords their readers would split (an
        unencoded @, / or ;): the pieces would reach logs as host names and paths."""
        from db.urls import check_url

        check_url(self.db_url, "CXR_DATABASE_URL")
        check_url(self.broker_url, "CXR_BROKER_URL")

    def check_layout(self) -> None:
        """Refuse an inbox that overlaps the service's own folders: intake would take (and
        move away) archived images, models or the database."""
        inbox = self.inbox_dir.resolve()
        owned = {"archive": self.archive_dir, "rejected": self.rejected_dir,
                 "models": self.models_path, "data": self.data_dir.absolute()}
        for label, folder in owned.items():
            other = folder.resolve()
            inside_other = other == inbox or other in inbox.parents
            if inside_other and not (label == "data" and inbox != other):
                raise CxrError(f"the inbox {inbox} lies in the {label} folder {other}; "
                               "set CXR_INBOX to a folder of its own")
            if inbox in other.parents:
                raise CxrError(f"the inbox {inbox} contains the {label} folder {other}; "
                               "set CXR_INBOX to a folder of its own")

    def ensure_dirs(self) -> None:
        """Create the data folders, private to the service user (they hold patient images and
        results), after checking the inbox does not overlap them."""
        self.check_layout()
        data = self.data_dir.absolute()
        data.mkdir(parents=True, exist_ok=True)
        _make_private(data)
        for path in (self.inbox_dir, self.models_path):
            path.mkdir(parents=True, exist_ok=True)
        for path in (self.archive_dir, self.rejected_dir):
            path.mkdir(parents=True, exist_ok=True)
            _make_private(path)

    def describe(self, image_id: int, file_name: str | None) -> str:
        """How logs name an image: its id and, unless hidden, its name with control
        characters escaped (a newline in a name must not forge a log line)."""
        if self.hide_file_names or not file_name:
            return f"image {image_id}"
        return f"image {image_id} ({printable(file_name)})"

    def shown_name(self, file_name: str) -> str:
        """A file name as logs may show it (see ``describe``)."""
        return "a file" if self.hide_file_names else printable(file_name)


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _make_private(path: Path) -> None:
    """0700 when this user owns ``path`` (a mounted volume owned by someone else stays as is)."""
    if path.stat().st_uid == os.geteuid():
        os.chmod(path, 0o700)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the README table is made from it."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        rows.append((f"CXR_{name.upper()}", default, field.description or ""))
    return rows
