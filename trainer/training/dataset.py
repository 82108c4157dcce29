"""tf.data input pipeline: decode, resize, cache, augment, shuffle, batch, prefetch.

It yields raw RGB pixels 0-255 as float32, because every trainer model carries its own
backbone preprocessing; feeding preprocessed pixels here would apply it twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


TRAIN_MAX_PIXELS = 200_000_000


def _decode_file(path: bytes, img_size: np.ndarray) -> np.ndarray:
    from db.exceptions import BadImageError, DatasetError
    from trainer.imaging.decode import decode_image

    try:
        return decode_image(Path(path.decode()), int(img_size), TRAIN_MAX_PIXELS)
    except BadImageError as exc:
        raise DatasetError(f"{path.decode()}: {exc}") from None


def decode_resize(path: tf.Tensor, img_size: int) -> tf.Tensor:
    """File path -> (img_size, img_size, 3) uint8, decoded by the worker's own decoder.

    Training and serving share ``trainer.imaging.decode`` (grey replicated to RGB, EXIF orientation,
    16-bit and palette handling, the same resize), so a model never meets pixels at serving
    time that were prepared differently from those it was trained on.
    """
    image = tf.numpy_function(_decode_file, [path, img_size], tf.uint8, stateful=False)
    image.set_shape((img_size, img_size, 3))
    return image


def make_augmenter(seed: int = 0, *, flip: bool = False) -> keras.Sequential:
    """Small geometric and photometric jitter; no horizontal flip unless asked (mirrors anatomy)."""
    layers: list[keras.layers.Layer] = [
        keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed),
        keras.layers.RandomZoom(0.08, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 2),
        keras.layers.RandomBrightness(0.1, value_range=(0.0, 255.0), seed=seed + 3),
        keras.layers.RandomContrast(0.1, value_range=(0.0, 255.0), seed=seed + 4),
    ]
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(layers, name="augment")


def decoded_dataset(
    paths: Sequence[Path | str], labels: Sequence[int], img_size: int, *, cache: bool | str = True
) -> tf.data.Dataset:
    """Unbatched (uint8 pixels, float32 label of shape (1,)), decoded and resized once.

    Cached as uint8 (a quarter of float32: the Kaggle train split at 224 px is ~0.7 GB) in
    memory (``cache=True``) or under a file prefix (str); ``batches`` turns it back to float.
    """
    ds = tf.data.Dataset.from_tensor_slices(
        ([str(p) for p in paths], np.asarray(labels, dtype=np.float32).reshape(-1, 1))
    )
    ds = ds.map(
        lambda p, y: (decode_resize(p, img_size), y),
        num_parallel_calls=AUTOTUNE,
    )
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    return ds


def batches(
    decoded: tf.data.Dataset,
    batch_size: int,
    *,
    training: bool = False,
    augment: bool = True,
    flip: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of float32 pixels 0-255; ``training`` shuffles (seeded, reshuffled every epoch)
    and, with ``augment``, applies the augmentation layers."""
    ds = decoded
    if training:
        ds = ds.shuffle(_buffer(decoded), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if training and augment:
        augmenter = make_augmenter(seed, flip=flip)
        ds = ds.map(
            lambda x, y: (tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0), y),
            num_parallel_calls=AUTOTUNE,
        )
    return ds.prefetch(AUTOTUNE)


def _buffer(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    return n if n > 0 else 10_000


def make_dataset(
    paths: Sequence[Path | str],
    labels: Sequence[int],
    img_size: int,
    batch_size: int,
    *,
    training: bool = False,
    augment: bool = True,
    flip: bool = False,
    seed: int = 0,
    cache: bool | str = True,
) -> tf.data.Dataset:
    """``decoded_dataset`` then ``batches``: (pixels 0-255 float32, label float32 (N, 1))."""
    decoded = decoded_dataset(paths, labels, img_size, cache=cache)
    return batches(decoded, batch_size, training=training, augment=augment, flip=flip, seed=seed)
