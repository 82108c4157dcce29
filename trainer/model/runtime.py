"""The numerical backend as the user meets it: TensorFlow's native start-up lines hidden by
default, compute sized to the process's share of the cores, and one line naming the device the
models run on. Serving runs on any Keras backend (``KERAS_BACKEND``); only the backend's own
branch here imports it.

TensorFlow writes oneDNN notices, absl warnings and, on every host without a GPU, a "failed call
to cuInit" error from C++, before Python logging exists. Unless the user set
``TF_CPP_MIN_LOG_LEVEL`` or asked for debug logs, the CLI sets it to 3 and the first import of
Keras runs with the process's stderr pointed at /dev/null (only C++ writes there during it;
a Python error still raises after stderr is back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

QUIET_LEVEL = "3"

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or ``taskset``'s share),
    which is what its threads can use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quiet_native_logs(debug: bool = False) -> None:
    """Ask TensorFlow's C++ side for nothing below fatal, unless the user chose otherwise."""
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_backend():
    """Import Keras and its backend (quietly when ``quiet_native_logs`` applied); returns keras."""
    if "keras" not in sys.modules and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == QUIET_LEVEL:
        with _stderr_silenced():
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices("GPU")  # the cuInit probe happens here
    import keras

    return keras


def configure_backend(threads: int = 0) -> str:
    """Size this process's compute to its share of the cores and let it share a GPU; returns the
    backend's name. Runs before the backend computes anything (later, TensorFlow keeps what it
    has).

    TensorFlow: ``threads`` intra-op threads (inter-op 1-2), GPU memory growth. PyTorch:
    ``torch.set_num_threads``. JAX: no GPU memory preallocated; XLA's CPU runtime has no thread
    setting and sizes its pool to the cores the process may run on, so to split a host between
    JAX workers give each its cores (``taskset``) or run one worker process.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # read by JAX only
    keras = load_backend()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        try:
            if threads > 0:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            log.debug("TensorFlow already initialised; thread and GPU settings left as they are")
    elif backend == "torch" and threads > 0:
        import torch

        torch.set_num_threads(threads)
    return backend


def describe_device() -> str:
    """One line: the backend and the device it computes on."""
    keras = load_backend()
    backend = keras.backend.backend()
    gpus: list[str] = []
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    elif backend == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform == "gpu"]
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if gpus:
        return f"models run on GPU ({', '.join(gpus)}) with Keras {keras.__version__} on {backend}"
    cores = usable_cpus()
    return (f"models run on the CPU ({cores} cores; no GPU found) with Keras {keras.__version__} "
            f"on {backend}")
