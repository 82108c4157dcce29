"""Grad-CAM: where in the image a model found its evidence for a class.

Selvaraju et al. (2017): take the last convolutional feature map A (h x w x C) of the image,
weight each channel by the mean gradient of the class's score over the map, sum, and keep what
is positive. The score here is the log-odds of the explained class (the logit under the final
sigmoid or softmax): that is what the decision threshold cuts, and a probability saturated at
1.0 would leave no gradient.

``build_explainer`` finds that feature map in any layout: the trainer's classifiers nest the
backbone as a sub-model behind a ``Preprocess`` layer; imported models are what they are. It
runs the model's layer graph again on new symbolic inputs, opening every nested model so each of
its layers is called on its own; the feature map becomes a tensor of one flat graph, cut into
two models that share the loaded model's layers and weights: pixels -> feature map and feature
map -> score. Nothing is saved or loaded, so bundles still load in safe mode.

Gradients are taken per backend: TensorFlow (``tf.GradientTape``) and JAX (``jax.grad`` over a
stateless call); another backend raises ExplainError.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops
from PIL import Image

from db.exceptions import ExplainError, NoFeatureMapError
from trainer.model.preprocessing import Preprocess

POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
"""Layers that only subsample a map: Grad-CAM takes the map before them (twice as sharp)."""
PROBABILITY_FLOOR = 1e-7

OnCall = Callable[[Any, tuple, dict], Any]


class Explainer:
    """A model cut at its last feature map: ``features`` (raw RGB 0-255 pixels -> map) and
    ``head`` (map -> logits, or probabilities when the final activation could not be split
    off), sharing the loaded model's weights."""

    def __init__(self, features, head, layer: str, logits: bool, input_size: int,
                 class_names: Sequence[str]) -> None:
        self.features = features
        self.head = head
        self.layer = layer
        self.logits = logits
        self.input_size = int(input_size)
        self.class_names = tuple(name.upper() for name in class_names)
        self._step: Callable | None = None
        self._lock = threading.Lock()

    def class_index(self, name: str) -> int:
        try:
            return self.class_names.index(str(name).upper())
        except ValueError:
            raise ExplainError(f"the model's classes {list(self.class_names)} do not include "
                               f"{name}") from None

    def maps_and_gradients(self, pixels: np.ndarray, signs: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
        """The feature maps of ``pixels`` and the gradient of the summed scores over them
        (``signs``: +1 explains class_names[1], -1 class_names[0])."""
        with self._lock:
            if self._step is None:
                self._step = _gradient_step(self)
            maps, grads = self._step(pixels, signs)
        return keras.ops.convert_to_numpy(maps), keras.ops.convert_to_numpy(grads)

    def __repr__(self) -> str:
        return f"Explainer(layer={self.layer!r}, {self.features.outputs[0].shape[1:]})"


# --- finding the feature map ---------------------------------------------------------------


def _opens(op) -> bool:
    """Whether ``op`` is a model whose layers can be called one by one."""
    return isinstance(op, keras.Sequential) or (
        isinstance(op, keras.Model) and hasattr(op, "_run_through_graph"))


def _run_flat(model, inputs, on_call: OnCall):
    """``model``'s outputs on symbolic ``inputs``, every leaf layer called through
    ``on_call(layer, args, kwargs)``: nested models are opened, never called whole."""
    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = _apply(layer, on_call, x)
        return x
    if _opens(model):
        return model._run_through_graph(
            inputs, operation_fn=lambda op: functools.partial(_apply, op, on_call))
    return on_call(model, (inputs,), {})


def _apply(op, on_call: OnCall, *args, **kwargs):
    if _opens(op):
        return _run_flat(op, args[0] if len(args) == 1 else list(args), on_call)
    return on_call(op, args, kwargs)


def _single(outputs):
    if isinstance(outputs, (list, tuple)):
        if len(outputs) != 1:
            raise ExplainError(f"the model has {len(outputs)} outputs; Grad-CAM needs one")
        return outputs[0]
    return outputs


def _convolves(op) -> bool:
    """A layer with a 4-D kernel: a convolution (plain, depthwise or separable)."""
    return any(len(w.shape) == 4 for w in getattr(op, "weights", ()))


def _is_map(tensor) -> bool:
    shape = getattr(tensor, "shape", None)
    return shape is not None and len(shape) == 4 and bool(shape[1]) and bool(shape[2])


def _activation_name(op) -> str | None:
    """The final activation a layer applies (read from the layer, not its config: serialising
    a config imports TensorFlow even on JAX)."""
    if isinstance(op, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(op, "activation", None), "__name__", None)


def _logits_twin(op):
    """A stand-in for the final layer that stops before its sigmoid or softmax: the identity
    for an activation layer, a linear copy sharing the weights of a dense layer; None for
    anything else (the score is then the log-odds of the probabilities)."""
    if _activation_name(op) not in ("sigmoid", "softmax"):
        return None
    if isinstance(op, (keras.layers.Activation, keras.layers.Softmax)):
        return lambda x: x
    if not isinstance(op, keras.layers.Dense):
        return None
    twin = keras.layers.Dense(op.units, use_bias=op.use_bias, name=f"{op.name}_logits")

    def call(x):
        y = twin(x)
        twin.set_weights(op.get_weights())
        return y

    return call


def build_explainer(model, manifest) -> Explainer:
    """Cut ``model`` (a bundle's, see ``trainer.model.bundle.Manifest``) at its last feature map.

    The map is the output of the last layer with a 4-D output at or after the first
    convolution, pooling layers aside, that the model's output depends on alone. Raises
    NoFeatureMapError when there is none (a model without convolutions).
    """
    size = int(manifest.input_size)

    def pixels_in():
        pixels = keras.Input((size, size, 3), name="pixels")
        x = pixels[..., :1] if manifest.color_mode == "grayscale" else pixels  # grey x 3 in
        if manifest.preprocessing_in_model:
            return pixels, x
        return pixels, Preprocess(manifest.preprocessing, name="explain_preprocess")(x)

    calls: list[tuple[Any, Any]] = []

    def record(op, args, kwargs):
        out = op(*args, **kwargs)
        calls.append((op, out))
        return out

    pixels, x = pixels_in()
    try:
        output = _single(_run_flat(model, x, record))
    except ExplainError:
        raise
    except Exception as exc:
        raise ExplainError(f"cannot trace {model.name} layer by layer: {exc}") from exc
    first_conv = next((i for i, (op, _) in enumerate(calls) if _convolves(op)), None)
    if first_conv is None:
        raise NoFeatureMapError(
            f"model {model.name} has no convolutional layer, so no feature map for Grad-CAM "
            "(it needs a layer giving height x width x channels before the classifier)")
    candidates = [i for i in range(first_conv, len(calls))
                  if _is_map(calls[i][1]) and not isinstance(calls[i][0], POOLING)]
    final = next((i for i in range(len(calls) - 1, -1, -1) if calls[i][1] is output), None)
    twin = _logits_twin(calls[final][0]) if final is not None else None
    logits = twin is not None or manifest.output == "logits"
    for target in reversed(candidates):
        head = _head(model, pixels_in, target, final, twin, calls[target][1])
        if head is not None:
            features = keras.Model(pixels, calls[target][1], name=f"{model.name}_features")
            return Explainer(features, head, calls[target][0].name, logits, size,
                             manifest.class_names)
    raise NoFeatureMapError(
        f"model {model.name} has no 4-D feature map that its output depends on alone "
        "(every one is bypassed by another branch), so Grad-CAM cannot weight one")


def _head(model, pixels_in, target: int, final: int | None, twin, feature_map):
    """feature map -> score, or None when the output also depends on something else."""
    fmap = keras.Input(tuple(feature_map.shape[1:]), name="feature_map")
    counter = itertools.count()

    def substitute(op, args, kwargs):
        i = next(counter)
        if i == target:
            return fmap
        if i == final and twin is not None:
            return twin(args[0])
        return op(*args, **kwargs)

    _, x = pixels_in()
    out = _single(_run_flat(model, x, substitute))
    try:
        return keras.Model(fmap, out, name=f"{model.name}_score")
    except ValueError:
        return None


_EXPLAINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EXPLAINERS_LOCK = threading.Lock()


def explainer_for(bundle) -> Explainer:
    """The explainer of a ``LoadedBundle``, built once per loaded bundle (a model without a
    feature map raises its NoFeatureMapError every time, without tracing it again)."""
    with _EXPLAINERS_LOCK:
        found = _EXPLAINERS.get(bundle)
        if found is None:
            try:
                found = build_explainer(bundle.model, bundle.manifest)
            except ExplainError as exc:
                found = exc
            _EXPLAINERS[bundle] = found
    if isinstance(found, ExplainError):
        raise found
    return found


# --- gradients, per backend ----------------------------------------------------------------


def _score(y, signs, logits: bool):
    """Sum over the batch of each image's log-odds of the explained class."""
    y = ops.cast(y, "float32")
    if logits:
        margin = y[:, -1] if y.shape[-1] == 1 else y[:, 1] - y[:, 0]
    else:
        p = ops.clip(y, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
        margin = (ops.log(p[:, -1]) - ops.log1p(-p[:, -1]) if y.shape[-1] == 1
                  else ops.log(p[:, 1]) - ops.log(p[:, 0]))
    return ops.sum(signs * margin)


def _gradient_step(explainer: Explainer) -> Callable:
    """(pixels, signs) -> (feature maps, d score / d maps), compiled for this backend."""
    backend = keras.backend.backend()
    features, head, logits = explainer.features, explainer.head, explainer.logits
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def step(pixels, signs):
            maps = features(pixels, training=False)
            with tf.GradientTape() as tape:
                tape.watch(maps)
                score = _score(head(maps, training=False), signs, logits)
            return maps, tape.gradient(score, maps)

        return step
    if backend == "jax":
        import jax

        def stateless(fv, hv, pixels, signs):
            maps, _ = features.stateless_call(fv[0], fv[1], pixels, training=False)

            def score(m):
                y, _ = head.stateless_call(hv[0], hv[1], m, training=False)
                return _score(y, signs, logits)

            return maps, jax.grad(score)(maps)

        compiled = jax.jit(stateless)

        def values(model):
            return ([v.value for v in model.trainable_variables],
                    [v.value for v in model.non_trainable_variables])

        return lambda pixels, signs: compiled(values(features), values(head), pixels, signs)
    raise ExplainError(f"heatmaps need gradients, taken here on TensorFlow or JAX; this "
                       f"process runs Keras on {backend} (set KERAS_BACKEND)")


# --- the map --------------------------------------------------------------------------------


def class_activation_maps(maps: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM from feature maps and their gradients, both (N, h, w, C): (N, h, w) in
    [0, 1], each scaled by its own peak (all zero where nothing speaks for the class)."""
    maps = np.asarray(maps, dtype=np.float64)
    weights = np.asarray(gradients, dtype=np.float64).mean(axis=(1, 2))
    cam = np.maximum(np.einsum("nhwc,nc->nhw", maps, weights), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """An (h, w) map resized bilinearly to (size, size), cell centres on pixel centres."""
    resized = Image.fromarray(np.asarray(cam, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def grad_cam(explainer: Explainer, pixels: np.ndarray, class_index: int | Sequence[int]
             ) -> np.ndarray:
    """Heatmaps (N, S, S) in [0, 1] for raw RGB 0-255 images (N, S, S, 3), each for its class
    (an index into the model's class names, one for all or one per image)."""
    x = np.asarray(pixels, dtype=np.float32)
    size = explainer.input_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise ValueError(f"expected pixels shaped (N, {size}, {size}, 3), got {x.shape}")
    if len(x) == 0:
        return np.zeros((0, size, size), dtype=np.float32)
    index = np.broadcast_to(np.asarray(class_index), (len(x),))
    signs = np.where(index == 1, 1.0, -1.0).astype(np.float32)
    maps, grads = explainer.maps_and_gradients(x, signs)
    return np.stack([upsample(cam, size) for cam in class_activation_maps(maps, grads)])
