"""What the file-writing callbacks of `written_once.py` need on a cluster:
which worker this process is, a folder of its own for what it writes but
nobody keeps, and a way for the workers to agree on a value.

Every worker runs every save. Under a collective strategy reading a variable
can be a collective: a sync-on-read variable (the gradient accumulators of
`gradient_accumulation_steps`) is summed over all workers when a save reads
it, so a save run by the chief alone would wait for the others for ever. As
tf.keras 2 did (`distributed_file_utils`), the other workers write the same
files to a temporary folder of their own, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import tempfile
import weakref

import keras

from keras_parallel._tf_internal import share_among_workers
from keras_parallel.parameter_server.strategy import ParameterServer

# Agreements made in this process, counted alike on every worker (each runs
# the same callbacks in the same order), and how long one waits for the
# others: the chief may be writing a large checkpoint meanwhile.
_AGREEMENTS = itertools.count()
AGREEMENT_TIMEOUT_SECONDS = 3600


class Workers:
    """This process's place in the cluster that `model` trains on.

    Args:
        model: A Keras model; its `distribute_strategy` says how many workers
            train it (strategies without `num_workers` run on one).
    """

    def __init__(self, model: keras.Model):
        strategy = model.distribute_strategy
        self.count = getattr(strategy, "num_workers", 1)
        self.index = getattr(strategy, "worker_index", 0)
        # Under ParameterServer the workers share one copy of the variables:
        # a save reads them with no collective, so the chief alone saves; a
        # restore writes them for every worker, so the chief alone restores,
        # and only variables it did not find already trained.
        self._shared = strategy if isinstance(strategy, ParameterServer) else None

    @property
    def share_variables(self) -> bool:
        """Whether the workers share one copy of the variables."""
        return self._shared is not None

    @property
    def restores(self) -> bool:
        """Whether this worker loads a backup's weights: every worker of a
        collective strategy; under ParameterServer the chief, when it
        initialised the variables itself."""
        return self._shared is None or not self._shared.found_variables

    @property
    def several(self) -> bool:
        """Whether the model trains on two or more workers."""
        return self.count > 1

    @property
    def writes(self) -> bool:
        """Whether this worker writes the files (the chief, or the only one)."""
        return self.index == 0

    def wait_for_all(self, what: str) -> None:
        """Returns once every (live) worker has reached this point."""
        if self._shared is not None:
            self._shared.extended.meetings.meet(what)
        else:
            self.gather(None)

    def gather(self, value) -> list:
        """Every worker's `value` (JSON-serialisable), in worker order; returns
        once all have given theirs, so it is also a barrier. Not under
        ParameterServer, whose cluster has no key-value store."""
        key = f"keras_parallel/files/{next(_AGREEMENTS)}"
        texts = share_among_workers(
            key, json.dumps(value), self.index, self.count, AGREEMENT_TIMEOUT_SECONDS
        )
        return [json.loads(text) for text in texts]


class Scratch:
    """A temporary folder for the writes of a worker other than the chief:
    made on first use, removed by `clear` or at the latest when this object
    is collected or the process exits."""

    def __init__(self, worker: int):
        self._prefix = f"keras_parallel_worker{worker}_"
        self._path: str | None = None

    def path(self) -> str:
        """The folder, made if need be."""
        if self._path is None:
            self._path = tempfile.mkdtemp(prefix=self._prefix)
            self._removal = weakref.finalize(self, shutil.rmtree, self._path, True)
        return self._path

    def clear(self) -> None:
        """Removes the folder and what is in it."""
        if self._path is not None:
            self._removal()
            self._path = None


@contextlib.contextmanager
def pointed_at(callback: keras.callbacks.Callback, name: str, path: str):
    """`callback.<name>` (the path argument of one of our callbacks) reads
    `path` inside the block, and its own value again after."""
    own = getattr(callback, name)
    setattr(callback, name, path)
    try:
        yield
    finally:
        setattr(callback, name, own)
