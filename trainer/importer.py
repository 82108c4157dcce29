"""Import a model trained elsewhere (``.keras`` or legacy ``.h5``) as a registered bundle.

Imported models take preprocessed input, so the manifest declares the preprocessing and the
loader applies it (``preprocessing_in_model=False``). Models load in safe mode: a file holding
a ``Lambda`` (arbitrary code) is refused.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from trainer.bundle import Manifest, bundle_sha256, load_bundle, save_bundle
from trainer.data import file_sha256
from worker.exceptions import CxrError

log = logging.getLogger(__name__)

SUFFIXES = (".keras", ".h5", ".hdf5")
DEFAULT_CLASS_NAMES = {"pneumonia": ["NORMAL", "PNEUMONIA"], "infection": ["BACTERIA", "VIRUS"]}


class ImportModelError(CxrError):
    """The model file cannot be imported as declared (the message says why)."""


def load_external_model(src: Path):
    """Load ``src`` in safe mode without compiling; errors become ImportModelError."""
    import keras

    import trainer.preprocessing  # noqa: F401  (registers Preprocess)

    src = Path(src)
    if src.suffix.lower() not in SUFFIXES:
        raise ImportModelError(f"{src.name}: expected a .keras or .h5 model file")
    if not src.is_file():
        raise ImportModelError(f"{src} does not exist")
    try:
        return keras.saving.load_model(src, compile=False, safe_mode=True)
    except Exception as exc:
        raise ImportModelError(f"cannot load {src.name} in safe mode: {exc}") from exc


def _final_activation(model) -> str | None:
    """Name of the activation the output layer applies ('linear', 'sigmoid', ...), if known."""
    layer = model.layers[-1] if model.layers else None
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None)


def output_kind(model, input_size: int, logits: bool) -> str:
    """'sigmoid', 'softmax' or 'logits', after checking shapes, the final activation and, for
    probabilities, that a probe batch gives values in [0, 1] (rows summing to 1 for softmax)."""
    in_shape = tuple(model.inputs[0].shape)[1:]
    if len(in_shape) != 3 or in_shape[2] != 3:
        raise ImportModelError(f"model input {in_shape} is not an RGB image (H, W, 3)")
    if in_shape[0] not in (None, input_size) or in_shape[1] not in (None, input_size):
        raise ImportModelError(f"model takes {in_shape[:2]} images, not --input-size {input_size}")
    out_shape = tuple(model.outputs[0].shape)
    if len(out_shape) != 2 or out_shape[1] not in (1, 2):
        raise ImportModelError(
            f"model output {out_shape} does not fit 2 classes (need 1 or 2 units)"
        )
    activation = _final_activation(model)
    if logits:
        if activation in ("sigmoid", "softmax"):
            raise ImportModelError(f"model ends in {activation}; drop --logits")
        return "logits"
    if activation == "linear":
        raise ImportModelError("model ends in a linear layer (raw logits); pass --logits")
    import keras

    probe = np.random.default_rng(0).uniform(-1.0, 1.0, (4, input_size, input_size, 3))
    y = keras.ops.convert_to_numpy(model(probe.astype(np.float32), training=False))
    if np.any(y < 0) or np.any(y > 1) or (y.shape[1] == 2 and not np.allclose(y.sum(1), 1, 1e-3)):
        raise ImportModelError("model outputs are not probabilities; pass --logits if they are raw")
    return "sigmoid" if y.shape[1] == 1 else "softmax"


def import_model(
    src: Path,
    *,
    stage: str,
    class_names: list[str] | None = None,
    input_size: int,
    preprocess: str,
    logits: bool = False,
    models_dir: Path,
    db_url: str,
    threshold: float = 0.5,
    promote: bool = False,
) -> int:
    """Register ``src`` as the next version of ``stage``; returns that version number.

    ``preprocess`` is a mode or backbone name (trainer.preprocessing); ``class_names`` defaults
    to the stage's classes, in the model's output order.
    """
    from db import registry
    from db.session import session_scope
    from trainer.preprocessing import resolve_mode

    src = Path(src)
    try:
        resolve_mode(preprocess)
    except ValueError as exc:
        raise ImportModelError(str(exc)) from None
    names = list(class_names or DEFAULT_CLASS_NAMES.get(stage, []))
    if len(names) != 2:
        raise ImportModelError(f"need exactly 2 class names in output order, got {names}")
    model = load_external_model(src)
    output = output_kind(model, input_size, logits)
    params = {
        "imported": True,
        "source_file": src.name,
        "source_sha256": file_sha256(src),
        "preprocessing": preprocess,
        "output": output,
    }
    directory: Path | None = None
    try:
        with session_scope(db_url) as session:
            mv = registry.register_version(
                session, stage=stage, backbone="imported", metrics={}, params=params
            )
            manifest = Manifest(
                stage=mv.stage,
                version=mv.version,
                class_names=names,
                input_size=input_size,
                threshold=threshold,
                backbone="imported",
                preprocessing=preprocess,
                preprocessing_in_model=False,
                output=output,
                params=params,
                code_version=mv.code_version,
            )
            directory = save_bundle(model, manifest, Path(models_dir) / mv.bundle_path)
            load_bundle(directory)
            mv.bundle_sha256 = bundle_sha256(directory)
            if promote:
                registry.promote(session, mv.stage, mv.version)
            version = mv.version
    except BaseException:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    log.info("imported %s as %s/v%d", src.name, stage, version)
    return version
