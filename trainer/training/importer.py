"""Import a model trained elsewhere (``.keras`` or legacy ``.h5``) as a registered bundle.

Imported models take preprocessed input, so the manifest declares the preprocessing and the
loader applies it (``preprocessing_in_model=False``). Models load in safe mode: a file holding
a ``Lambda`` (arbitrary code) is refused.

How the model was fed is declared too, and the workers repeat it exactly: the resize filter
(default ``nearest``, what ``keras.utils.load_img`` does) and the colour mode (default: from the
model's input channels, 1 = grayscale, 3 = rgb).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from db.exceptions import ImportModelError
from db.vocabulary import STAGE_CLASSES
from trainer.imaging.checksum import sha256_file
from trainer.model.bundle import COLOR_MODES, Manifest, load_keras_model, single_output

log = logging.getLogger(__name__)

SUFFIXES = (".keras", ".h5", ".hdf5")
IMPORT_RESIZE = "nearest"
"""``keras.utils.load_img``'s default interpolation: what most models trained elsewhere saw."""
PER_PIXEL_MODES = ("none", "scale01", "tf", "efficientnet")
"""Preprocessing that does not assume three colour channels (usable for greyscale models)."""


def load_external_model(src: Path):
    """Load ``src`` in safe mode without compiling; errors become ImportModelError."""
    src = Path(src)
    if src.suffix.lower() not in SUFFIXES:
        raise ImportModelError(f"{src.name}: expected a .keras or .h5 model file")
    if not src.is_file():
        raise ImportModelError(f"{src} does not exist")
    try:
        return load_keras_model(src)
    except Exception as exc:
        raise ImportModelError(f"cannot load {src.name} in safe mode: {exc}") from exc


def _final_activation(model) -> str | None:
    """Name of the activation the output layer applies ('linear', 'sigmoid', ...), if known."""
    layer = model.layers[-1] if model.layers else None
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None)


def color_mode_of(model, declared: str | None) -> str:
    """The colour mode the model takes: ``declared`` checked against its input channels, or
    told from them (1 channel: grayscale, 3: rgb)."""
    in_shape = tuple(model.inputs[0].shape)[1:]
    by_channels = {n: mode for mode, n in COLOR_MODES.items()}
    if len(in_shape) != 3 or in_shape[2] not in by_channels:
        raise ImportModelError(
            f"model input {in_shape} is not an image (H, W, 1) greyscale or (H, W, 3) RGB")
    found = by_channels[in_shape[2]]
    if declared is not None and declared != found:
        raise ImportModelError(f"--color-mode {declared} does not fit the model's input "
                               f"{in_shape} ({found})")
    return found


def output_kind(model, input_size: int, logits: bool, channels: int = 3) -> str:
    """'sigmoid', 'softmax' or 'logits', after checking shapes, the final activation and, for
    probabilities, that a probe batch gives values in [0, 1] (rows summing to 1 for softmax)."""
    in_shape = tuple(model.inputs[0].shape)[1:]
    if in_shape[0] not in (None, input_size) or in_shape[1] not in (None, input_size):
        raise ImportModelError(f"model takes {in_shape[:2]} images, not --input-size {input_size}")
    if len(model.outputs) != 1:
        raise ImportModelError(f"model has {len(model.outputs)} outputs; need exactly one")
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

    probe = np.random.default_rng(0).uniform(-1.0, 1.0, (4, input_size, input_size, channels))
    y = keras.ops.convert_to_numpy(single_output(model(probe.astype(np.float32),
                                                       training=False)))
    if np.any(y < 0) or np.any(y > 1) or (y.shape[1] == 2 and not np.allclose(y.sum(1), 1, 1e-3)):
        raise ImportModelError("model outputs are not probabilities; pass --logits if they are raw")
    return "sigmoid" if y.shape[1] == 1 else "softmax"


def _checked_mode(preprocess: str, resize: str) -> str:
    """The preprocessing mode ``preprocess`` names, with ``resize`` checked too."""
    from trainer.imaging.decode import RESIZE_FILTERS
    from trainer.model.preprocessing import resolve_mode

    try:
        mode = resolve_mode(preprocess)
    except ValueError as exc:
        raise ImportModelError(str(exc)) from None
    if resize not in RESIZE_FILTERS:
        raise ImportModelError(f"--resize must be one of {', '.join(RESIZE_FILTERS)}")
    return mode


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
    resize: str = IMPORT_RESIZE,
    color_mode: str | None = None,
    reference: Path | None = None,
    say: Callable[[str], None] = log.info,
) -> int:
    """Register ``src`` as the next version of ``stage``; returns that version number.

    ``preprocess`` is a mode or backbone name (trainer.model.preprocessing); ``class_names``
    defaults to the stage's classes, in the model's output order; ``resize`` and ``color_mode``
    say how images were fed to it (see the module docstring). ``reference``: a folder of the
    site's known-good chest X-rays to fit the input gate on (``reference_gate``); what was
    fitted is told to ``say``.
    """
    from trainer.training.publish import publish_model

    src = Path(src)
    mode = _checked_mode(preprocess, resize)
    names = list(class_names or STAGE_CLASSES.get(stage, ()))
    if len(names) != 2:
        raise ImportModelError(f"need exactly 2 class names in output order, got {names}")
    model = load_external_model(src)
    color_mode = color_mode_of(model, color_mode)
    if color_mode == "grayscale" and mode not in PER_PIXEL_MODES:
        raise ImportModelError(f"--preprocess {preprocess} needs 3 colour channels; a greyscale "
                               f"model takes one of {', '.join(PER_PIXEL_MODES)}")
    output = output_kind(model, input_size, logits, COLOR_MODES[color_mode])
    params = {
        "imported": True, "source_file": src.name, "source_sha256": sha256_file(src),
        "preprocessing": preprocess, "output": output, "resize": resize,
        "color_mode": color_mode,
    }
    manifest = Manifest(
        stage=stage, version=0, class_names=names, input_size=input_size, threshold=threshold,
        backbone="imported", preprocessing=preprocess, preprocessing_in_model=False,
        output=output, color_mode=color_mode, resize=resize, params=params,
    )
    extras = None
    if reference is not None:
        extras, summary = reference_gate(model, manifest, Path(reference))
        say(summary)
    published = publish_model(
        model, manifest, models_dir=models_dir, db_url=db_url, promote=promote, verify_load=True,
        extras=extras,
    )
    log.info("imported %s as %s", src.name, published.name)
    return published.version


REFERENCE_MAX_PIXELS = 60_000_000
"""Decoded pixel limit for reference images (the service's default ``CXR_MAX_IMAGE_PIXELS``)."""


def reference_images(folder: Path, size: int, resize: str) -> tuple[np.ndarray, list[str]]:
    """(the decodable images under ``folder`` at the model's feed, the names that were not)."""
    from db.exceptions import BadImageError
    from trainer.imaging.decode import decode_image

    if not folder.is_dir():
        raise ImportModelError(f"--reference {folder} is not a folder")
    good, bad = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            good.append(decode_image(path, size, REFERENCE_MAX_PIXELS, resize))
        except (BadImageError, OSError):
            bad.append(path.name)
    if not good:
        raise ImportModelError(f"--reference {folder} holds no image that decodes")
    return np.stack(good), bad


def reference_gate(model, manifest: Manifest, folder: Path) -> tuple[dict[str, bytes], str]:
    """Fit the input gate of ``model`` on the chest X-rays in ``folder`` (at least 12; a few
    dozen intended), record it in ``manifest``; returns (the bundle's extra files, a summary
    of what was fitted)."""
    from trainer.model.bundle import LoadedBundle
    from trainer.model.gate_bundle import attach_gate, fit_gate_from_reference

    if manifest.channels != 3:
        raise ImportModelError("--reference needs a model that takes RGB input; a greyscale "
                               "model gets no input gate")
    images, bad = reference_images(folder, manifest.input_size, manifest.resize)
    try:
        gate, layer, summary = fit_gate_from_reference(LoadedBundle(model, manifest, folder),
                                                       images)
    except ValueError as exc:
        raise ImportModelError(f"--reference {folder}: {exc}") from None
    if bad:
        summary += f"; {len(bad)} file(s) did not decode and were left out (first: {bad[0]})"
    return attach_gate(manifest, gate, layer), summary
