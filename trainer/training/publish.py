"""Publishing a model: the one path from a Keras model to a registered, servable bundle.

Register the next version of the stage, write the bundle (model, manifest, any report files)
at ``<models_dir>/<stage>/v<N>``, record its hash and promote it if asked, in one transaction;
if anything fails the half-written bundle is removed and no version is left behind. The
trainer, the importer, the bench and the tests all publish through here.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.model.bundle import Manifest, bundle_sha256, load_bundle, save_bundle


@dataclass(frozen=True)
class Published:
    """What was registered (plain values, usable after the session closed)."""

    stage: str
    version: int
    status: str
    bundle_dir: Path

    @property
    def name(self) -> str:
        return f"{self.stage}/v{self.version}"


def publish_model(
    model,
    manifest: Manifest,
    *,
    models_dir: Path | str,
    db_url: str,
    extra_files: Iterable[Path] = (),
    promote: bool = False,
    verify_load: bool = False,
    extras: dict[str, bytes] | None = None,
) -> Published:
    """Publish ``model`` as the next version of ``manifest.stage``.

    The manifest's ``version`` is replaced by the one the registry allocates and its
    ``code_version`` defaults to this checkout's. ``verify_load`` loads the saved bundle back
    in safe mode before committing (for models made elsewhere). ``extras``: further files
    written with the bundle in its atomic step (``gate.npz``, named in the manifest).
    """
    from db import registry
    from db.session import session_scope

    manifest = dataclasses.replace(manifest, code_version=manifest.code_version or code_version())
    bundle_dir: Path | None = None
    try:
        with session_scope(db_url) as session:
            mv = registry.register_version(
                session, stage=manifest.stage, backbone=manifest.backbone,
                metrics=manifest.metrics, params=manifest.params,
                dataset_fingerprint=manifest.dataset_fingerprint,
                parent_version=manifest.parent_version, code_version=manifest.code_version,
            )
            final = dataclasses.replace(manifest, version=mv.version)
            bundle_dir = save_bundle(model, final, Path(models_dir) / mv.bundle_path, extras)
            for source in extra_files:
                if Path(source).exists():
                    shutil.copy2(source, bundle_dir / Path(source).name)
            if verify_load:
                load_bundle(bundle_dir)
            registry.set_bundle_sha256(session, mv.id, bundle_sha256(bundle_dir))
            if promote:
                mv = _promote_audited(session, mv.stage, mv.version)
            session.flush()
            published = Published(mv.stage, mv.version, str(mv.status), bundle_dir)
    except BaseException:
        if bundle_dir is not None:
            shutil.rmtree(bundle_dir, ignore_errors=True)
        raise
    return published


def _promote_audited(session, stage: str, version: int):
    """Promote at publication (``--promote``), with its audit row in the same transaction."""
    from db import audit, registry

    before = registry.get_production(session, stage)
    promoted = registry.promote(session, stage, version)
    audit.record(session, "promote", stage=stage, version=version,
                 detail={"from": before.version if before else None, "to": version,
                         "at": "publish"})
    return promoted


def code_version() -> str:
    """The git commit that made the model (``-dirty`` when modified), else the package version."""
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"cxr-triage {version('cxr-triage')}"
        except PackageNotFoundError:
            return "unknown"
