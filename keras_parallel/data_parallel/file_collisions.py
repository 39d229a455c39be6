"""Keras' own file-writing callbacks under DataParallel on a cluster: a
warning when `fit` starts, and an explanation of HDF5's "unable to lock
file" when two workers' saves collide.

Every worker runs its own copy of each callback, and Keras 3's callbacks
never consult the strategy, so each writes the same files
(`keras_parallel.callbacks.written_once` has the drop-ins that do not).

No hook gives a strategy the callbacks of `fit`, nor the errors its callbacks
raise: Keras builds its `CallbackList` inside `fit` and calls the callbacks
itself. So the warning reads the `callbacks` argument of the `fit` on the
stack when `fit` distributes its data (`_tf_internal.fit_callbacks`), and
the explanation comes from `sys.excepthook`, Python's hook for an error that
ends the script, which is how such a collision ends a launched worker (an
explainer of `keras_parallel.error_reports`).
"""

from __future__ import annotations

import warnings
import weakref

import keras

from keras_parallel._tf_internal import fit_callbacks
from keras_parallel.error_reports import add_explainer, chain

WRITERS = (
    keras.callbacks.BackupAndRestore,
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
)
DROP_INS = ", ".join(f"keras_parallel.callbacks.{c.__name__}" for c in WRITERS)
LOCK_MESSAGE = (
    "keras_parallel: two workers wrote the same HDF5 file at once. Under a "
    "multi-worker DataParallel every worker runs each callback, and Keras' "
    "BackupAndRestore and ModelCheckpoint save on all of them. Use "
    f"{DROP_INS} (the same arguments): worker 0 alone writes their files and "
    "every worker reads what it needs."
)
_warned: weakref.WeakSet = weakref.WeakSet()


def warn_about_keras_writers() -> None:
    """Warns once per callback about each Keras file-writing callback given
    to the `fit` (or `evaluate`) this is called from."""
    from keras_parallel.callbacks.written_once import ChiefWrites

    for callback in fit_callbacks():
        if (
            not isinstance(callback, WRITERS)
            or isinstance(callback, ChiefWrites)
            or callback in _warned
        ):
            continue
        _warned.add(callback)
        name = next(c.__name__ for c in WRITERS if isinstance(callback, c))
        warnings.warn(
            f"keras.callbacks.{name} runs on every worker of this multi-worker "
            "DataParallel and each writes its files: at the same path they "
            "collide (HDF5 'unable to lock file', one event file per worker, "
            f"interleaved rows). Use keras_parallel.callbacks.{name} (the "
            "same arguments): worker 0 alone writes the files and every "
            "worker reads what it needs.",
            stacklevel=2,
        )


def explain_lock_errors() -> None:
    """Makes an HDF5 "unable to lock file" error that ends the script end
    with `LOCK_MESSAGE`, printed after it."""
    add_explainer(_explain)


def _explain(error: BaseException) -> str | None:
    """`LOCK_MESSAGE` when `error`, or one it was raised from, is HDF5's
    lock failure."""
    for cause in chain(error):
        if isinstance(cause, OSError) and "unable to lock file" in str(cause):
            return LOCK_MESSAGE
    return None
