"""Model bundles: ``<models_dir>/<stage>/v<N>/`` with ``model.keras`` and ``manifest.json``.

The bundle is the only thing the trainer hands to the workers. The manifest says how to feed the
model (input size, preprocessing, output kind) and how to read its answer (class order,
threshold), so the worker never guesses. Bundles are written once, into a temporary folder that
is renamed into place, and loaded in Keras safe mode.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from db.exceptions import ModelNotFoundError
from trainer.imaging.checksum import hash_stream, new_digest
from trainer.imaging.decode import SERVICE_RESIZE, Feed, check_resize

MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
OUTPUTS = ("sigmoid", "softmax", "logits")
COLOR_MODES = {"rgb": 3, "grayscale": 1}
"""Colour mode -> channels the model takes. Pixels are grey either way
(``trainer.imaging.decode``): an RGB model gets grey x 3, a greyscale one the grey alone."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """What a worker needs to feed a bundle's model and read its answer.

    ``threshold``: the image is ``class_names[1]`` when its probability is >= threshold.
    ``output``: "sigmoid" (N,1) probability of class_names[1]; "softmax" (N,2); "logits" raw
    (N,1) or (N,2). ``preprocessing`` is a mode or backbone name (see trainer.model.preprocessing);
    it is applied by the loader only when ``preprocessing_in_model`` is False. ``resize`` is how
    images are squashed to ``input_size`` (``trainer.imaging.decode.RESIZE_METHODS``);
    manifests from before it existed get the service's own, which is what fed them then.
    ``gate``: the input gate's file and threshold (``trainer.model.gate_bundle``), empty when the
    bundle has none; ``calibration``: temperature and uncertain band per ``trainer.model.
    calibration``, empty when uncalibrated. Both default empty, so older manifests load unchanged.
    """

    stage: str
    version: int
    class_names: list[str]
    input_size: int
    threshold: float = 0.5
    backbone: str = "unknown"
    preprocessing: str = "none"
    preprocessing_in_model: bool = True
    output: str = "sigmoid"
    color_mode: str = "rgb"
    resize: str = SERVICE_RESIZE
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    parent_version: int | None = None
    code_version: str | None = None
    created_at: str = field(default_factory=_now)
    synthetic: bool = False
    gate: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != 2:
            raise ValueError(f"class_names must name 2 classes, got {self.class_names!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be one of {tuple(COLOR_MODES)}, "
                             f"got {self.color_mode!r}")
        check_resize(self.resize)
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold!r}")
        if int(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size!r}")

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode]

    @property
    def feed(self) -> Feed:
        """What the decoder must produce for this model (size and resize method)."""
        return Feed(int(self.input_size), self.resize)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from a dict; unknown keys (from newer writers) are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["class_names"] = list(values.get("class_names", []))
        for name, kind in (("version", int), ("input_size", int), ("threshold", float)):
            if name in values:
                values[name] = kind(values[name])
        return cls(**values)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_dict(json.loads(Path(path).read_text()))


def model_input(batch: np.ndarray) -> np.ndarray:
    """What a batch of raw 0-255 pixels enters a model as: a uint8 batch as it is (the model's
    input layer casts it to its own dtype, exactly, since 0..255 are exact in every float type;
    a float32 copy made here would move four times the bytes, most of a near-free model's CPU
    and of the transfer to a GPU), anything else as float32."""
    batch = np.asarray(batch)
    return batch if batch.dtype == np.uint8 else batch.astype(np.float32, copy=False)


def single_output(y):
    """A model's one output: a functional model saved with ``outputs=[tensor]`` answers with a
    one-element list, which is the same model. More than one output is an error."""
    if isinstance(y, (list, tuple)):
        if len(y) != 1:
            raise ValueError(f"model has {len(y)} outputs; a classifier here needs exactly one")
        return y[0]
    return y


def _check_model_matches(model, manifest: Manifest) -> None:
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    size, channels = manifest.input_size, manifest.channels
    if shape is not None and tuple(shape[1:]) not in ((size, size, channels),
                                                      (None, None, channels)):
        raise ValueError(f"model input {shape} does not match manifest input_size {size} "
                         f"({manifest.color_mode}, {channels} channel(s))")
    outputs = getattr(model, "outputs", None)
    units = int(single_output(outputs).shape[-1]) if outputs else None
    allowed = {"sigmoid": (1,), "softmax": (2,), "logits": (1, 2)}[manifest.output]
    if units is not None and units not in allowed:
        raise ValueError(
            f"model has {units} output units; output {manifest.output!r} needs {allowed}"
        )


def save_bundle(model, manifest: Manifest, directory: Path,
                extras: dict[str, bytes] | None = None) -> Path:
    """Write ``model.keras`` and ``manifest.json`` to ``directory`` atomically; returns it.

    ``extras`` are further files written in the same step (``gate.npz``); the manifest should
    name them with their checksum, which ``bundle_sha256`` then covers. Refuses to overwrite
    an existing bundle: versions are immutable once registered.
    """
    from trainer.model.preprocessing import resolve_mode

    directory = Path(directory)
    resolve_mode(manifest.preprocessing)
    _check_model_matches(model, manifest)
    if (directory / MODEL_FILE).exists() or (directory / MANIFEST_FILE).exists():
        raise FileExistsError(f"a model bundle already exists at {directory}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save(tmp / MODEL_FILE)
        manifest.write(tmp / MANIFEST_FILE)
        for name, data in (extras or {}).items():
            if Path(name).name != name or name in (MODEL_FILE, MANIFEST_FILE):
                raise ValueError(f"bad extra bundle file name {name!r}")
            (tmp / name).write_bytes(data)
        if directory.exists():
            directory.rmdir()
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def bundle_sha256(directory: Path) -> str:
    """SHA-256 over ``model.keras`` then ``manifest.json`` (names included), for the registry."""
    digest = new_digest()
    for name in (MODEL_FILE, MANIFEST_FILE):
        digest.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as fh:
            hash_stream(fh, digest)
    return digest.hexdigest()


class LoadedBundle:
    """A loaded model plus its manifest; ``predict_proba`` is the one way to run it.

    Keras 3 only, so a worker serves the same bundle on TensorFlow, JAX or PyTorch: the model is
    wrapped (when the manifest asks) with its declared preprocessing and an output activation,
    and runs through that model's own compiled predict function, which each backend builds once
    per input shape (callers keep to a few batch sizes, see ``worker.classify.inference``).
    """

    def __init__(self, model, manifest: Manifest, directory: Path) -> None:
        self.model = model
        self.manifest = manifest
        self.directory = Path(directory)
        self._serving = _serving_model(model, manifest)
        self._lock = threading.Lock()  # JAX's predict donates and then rewrites the weights

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """Probability of ``class_names[1]`` for raw 0-255 grey x 3 images (N, S, S, 3) as the
        decoder gives them; a greyscale model gets one channel (N, S, S, 1), which it may also
        be given directly."""
        x = model_input(batch)
        size, channels = self.manifest.input_size, self.manifest.channels
        if x.ndim != 4 or x.shape[1:3] != (size, size) or x.shape[3] not in (3, channels):
            raise ValueError(f"expected a batch shaped (N, {size}, {size}, 3), got {x.shape}")
        x = x[..., :channels]
        if x.shape[0] == 0:
            return np.zeros((0,), dtype=np.float32)
        with self._lock:
            y = single_output(self._serving.predict_on_batch(x))
        return np.asarray(y, dtype=np.float32)[:, -1]

    def __repr__(self) -> str:
        return f"LoadedBundle({self.manifest.stage}/v{self.manifest.version}, {self.directory})"


def _serving_model(model, manifest: Manifest):
    """``model`` taking raw pixels and giving probabilities: the manifest's preprocessing
    before it when it is not inside, a sigmoid or softmax after it when it gives logits."""
    if manifest.preprocessing_in_model and manifest.output != "logits":
        return model
    import keras

    from trainer.model.preprocessing import Preprocess

    size = manifest.input_size
    inputs = keras.Input((size, size, manifest.channels), name="pixels")
    x = inputs if manifest.preprocessing_in_model else Preprocess(manifest.preprocessing)(inputs)
    y = single_output(model(x, training=False))
    if manifest.output == "logits":
        y = keras.layers.Activation("sigmoid" if y.shape[-1] == 1 else "softmax",
                                    dtype="float32")(y)
    return keras.Model(inputs, y, name=f"{model.name}_serving")


def load_keras_model(path: Path | str):
    """Load a ``.keras`` (or ``.h5``) file uncompiled, in safe mode, with this project's layers
    registered: the only way a model file is opened, so none can run code on load."""
    import keras

    import trainer.model.preprocessing  # noqa: F401  (registers the Preprocess layer)

    return keras.saving.load_model(path, compile=False, safe_mode=True)


def load_bundle(directory: Path) -> LoadedBundle:
    """Load a bundle in safe mode; a missing or unreadable one raises ModelNotFoundError."""
    directory = Path(directory)
    model_path, manifest_path = directory / MODEL_FILE, directory / MANIFEST_FILE
    for path in (model_path, manifest_path):
        if not path.is_file():
            raise ModelNotFoundError(f"model bundle incomplete: {path} is missing")
    try:
        manifest = Manifest.read(manifest_path)
    except (ValueError, TypeError, KeyError) as exc:
        msg = f"model bundle manifest {manifest_path} is invalid: {exc}"
        raise ModelNotFoundError(msg) from exc
    try:
        model = load_keras_model(model_path)
    except Exception as exc:
        raise ModelNotFoundError(f"model bundle {model_path} cannot be loaded: {exc}") from exc
    try:
        _check_model_matches(model, manifest)
        return LoadedBundle(model, manifest, directory)
    except ValueError as exc:
        raise ModelNotFoundError(f"model bundle {directory} is inconsistent: {exc}") from exc
