"""The input gate inside a model bundle: its features, its file, and fitting it from a reference.

A gate belongs to one model version (its features mean nothing to another), so it travels in
the bundle as ``gate.npz`` (plain float arrays and a JSON string, loaded without pickle) and the
manifest's ``gate`` entry names the file with its SHA-256, which the bundle checksum therefore
covers. ``FeatureModel`` gives the penultimate features and the probability in one forward pass
(a ``keras.Model`` with two outputs, built once per loaded bundle; Keras ops only), so the gate
costs a few small matrix products beside the model, not a second pass.

Which features: the input of the model's last ``Dense`` layer. For this project's classifiers
that is the pooled backbone output (after ``gap`` and an inference-time no-op ``dropout``); for
a model trained elsewhere it is the same by construction of almost every classification head.
A model whose last Dense sees a feature map gets that map averaged over space.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np

from db.exceptions import ModelNotFoundError
from trainer.model.bundle import LoadedBundle, Manifest, model_input
from trainer.model.gate import InputGate, cross_fit_input_gate
from trainer.model.ood import Gate

GATE_FILE = "gate.npz"
SCORE_KIND = "pca-mahalanobis-ledoit-wolf+residual"


def penultimate_layer(model):
    """The model's last Dense layer (its input is what the gate reads); ValueError if none."""
    import keras

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"model {model.name!r} has no Dense layer to take features from")
    return dense[-1]


def _two_output_model(model, manifest: Manifest):
    """raw pixels -> (features, probabilities), mirroring ``bundle._serving_model``."""
    import keras

    from trainer.model.preprocessing import Preprocess

    head = penultimate_layer(model)
    inner = keras.Model(model.inputs, [head.input, model.outputs[0]], name=f"{model.name}_feat")
    size = manifest.input_size
    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs if manifest.preprocessing_in_model else Preprocess(manifest.preprocessing)(inputs)
    features, y = inner(x, training=False)
    if manifest.output == "logits":
        y = keras.layers.Activation("sigmoid" if y.shape[-1] == 1 else "softmax",
                                    dtype="float32")(y)
    return keras.Model(inputs, [features, y], name=f"{model.name}_gated"), head.name


class FeatureModel:
    """A loaded bundle's model with its penultimate features as a second output."""

    def __init__(self, bundle: LoadedBundle) -> None:
        self.bundle = bundle
        self.model, self.layer = _two_output_model(bundle.model, bundle.manifest)
        self._lock = getattr(bundle, "_lock", None) or threading.Lock()

    @classmethod
    def from_model(cls, model, manifest: Manifest) -> FeatureModel:
        """For the trainer, before the bundle is saved (the gate goes into it)."""
        return cls(LoadedBundle(model, manifest, Path(".")))

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), probability of class_names[1] (N,)) for raw RGB 0-255 images."""
        x = model_input(batch)
        size = self.bundle.manifest.input_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(f"expected a batch shaped (N, {size}, {size}, 3), got {x.shape}")
        with self._lock:
            features, y = self.model.predict_on_batch(x)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim > 2:
            features = features.reshape(len(x), -1, features.shape[-1]).mean(axis=1)
        return features, np.asarray(y, dtype=np.float32)[:, -1]

    def features(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Features of many images, in batches."""
        parts = [self.predict(images[i:i + batch_size])[0]
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# --- the file -------------------------------------------------------------------------------

_PARTS = ("features", "layout")


def gate_bytes(gate: InputGate) -> bytes:
    """``gate.npz``'s content: per part (``features.*``, ``layout.*``) float64 arrays and its
    info as a JSON string."""
    arrays = {}
    for part in _PARTS:
        g: Gate = getattr(gate, part)
        arrays.update({f"{part}.mean": g.mean, f"{part}.components": g.components,
                       f"{part}.precision": g.precision,
                       f"{part}.scales": np.array([g.maha_scale, g.residual_scale, g.threshold]),
                       f"{part}.info": np.array(json.dumps(g.info, sort_keys=True))})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def gate_from_bytes(data: bytes) -> InputGate:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        parts = {}
        for part in _PARTS:
            maha, residual, threshold = (float(v) for v in npz[f"{part}.scales"])
            parts[part] = Gate(npz[f"{part}.mean"], npz[f"{part}.components"],
                               npz[f"{part}.precision"], residual, threshold, maha,
                               json.loads(str(npz[f"{part}.info"])))
    return InputGate(**parts)


def _entry(g: Gate) -> dict:
    keys = ("dims", "feature_dim", "n_fit", "n_threshold", "max_false_refusal", "shrinkage")
    return {"threshold": round(float(g.threshold), 6), **{k: g.info[k] for k in keys
                                                          if k in g.info}}


def attach_gate(manifest: Manifest, gate: InputGate, layer: str) -> dict[str, bytes]:
    """Record ``gate`` in ``manifest.gate`` and return the ``extras`` for ``save_bundle``.

    The manifest entry: file, sha256, score kind, layer, source, max_false_refusal (both parts
    together), and per part (``features``, ``layout``) its threshold, dims, feature_dim,
    n_fit, n_threshold and shrinkage.
    """
    data = gate_bytes(gate)
    manifest.gate = {
        "file": GATE_FILE, "sha256": hashlib.sha256(data).hexdigest(), "score": SCORE_KIND,
        "layer": layer, "source": gate.features.info.get("source"),
        "max_false_refusal": gate.max_false_refusal,
        "features": _entry(gate.features), "layout": _entry(gate.layout),
    }
    return {GATE_FILE: data}


def load_gate(bundle: LoadedBundle) -> InputGate | None:
    """The bundle's gate, or None when its manifest has none (older bundles); a missing or
    altered file raises ModelNotFoundError, like a broken model file."""
    entry = bundle.manifest.gate
    if not entry:
        return None
    path = Path(bundle.directory) / entry.get("file", GATE_FILE)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelNotFoundError(f"model bundle gate {path} cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ModelNotFoundError(f"model bundle gate {path} does not match its manifest")
    try:
        return gate_from_bytes(data)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelNotFoundError(f"model bundle gate {path} is invalid: {exc}") from exc


# --- a site's reference ---------------------------------------------------------------------


def fit_gate_from_reference(bundle: LoadedBundle, images: np.ndarray,
                            max_false_refusal: float = 0.01) -> tuple[InputGate, str, str]:
    """Fit a gate for an imported model on a folder's worth of known-good chest X-rays.

    ``images``: decoded (N, S, S, 3) uint8 at the bundle's input size, N >= 12 (a few dozen is
    the intended use). Leave-one-out thresholds (``cross_fit_gate``) with k = min(32, N/3)
    principal dimensions and Ledoit-Wolf shrinkage. Returns (gate, layer name, a summary).
    """
    x = np.asarray(images)
    if len(x) < 12:
        raise ValueError(f"a reference needs at least 12 images, got {len(x)}")
    runner = FeatureModel(bundle)
    gate = cross_fit_input_gate(runner.features(x), x, max_false_refusal)
    f, lay = gate.features.info, gate.layout.info
    expected = max(max_false_refusal, 2 / (len(x) + 1))
    summary = (
        f"input gate fitted on {len(x)} reference images: features of layer {runner.layer!r}"
        f" ({f['feature_dim']} values) reduced to {f['dims']} principal dimensions (shrinkage"
        f" {f['shrinkage']:.2f}), threshold {gate.features.threshold:.2f}; 8x8 layout reduced"
        f" to {lay['dims']} (shrinkage {lay['shrinkage']:.2f}), threshold"
        f" {gate.layout.threshold:.2f}; thresholds from leave-one-out scores; expect about"
        f" {expected:.1%} of images like the reference to be refused"
        + (f" (more than the {max_false_refusal:.0%} asked: add reference images)"
           if expected > max_false_refusal else "")
    )
    return gate, runner.layer, summary
