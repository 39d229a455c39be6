"""`ReplicaStrategy`: what the strategies run by `engine.DataParallelEngine`
(`DataParallel`, `MeshParallel`) offer beyond `tf.distribute.Strategy`."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import SavedWithModel
from keras_parallel.reduction.compression import Total
from keras_parallel.scope_errors import explained


class ReplicaStrategy(tf.distribute.Strategy, SavedWithModel):
    """A strategy whose replicas each take a piece of every batch and whose
    extended is a `DataParallelEngine`: its scope's errors name the fix, it
    reports the bytes it communicates, and the gradient compression's state
    is saved with every model built in its scope."""

    # Read by MirroredExtended, and by the multi-worker engine as its first
    # collective group key; on one machine no collective ops are launched.
    _collective_key_base = 0

    def scope(self):
        """`tf.distribute.Strategy.scope`: models, optimizers and metrics
        made in it are distributed. An optimizer made outside the scope and
        used by a model made in it gets an error naming it and the fix.

        Returns:
            A context manager.
        """
        return explained(super().scope())

    @property
    def num_replicas_in_sync(self) -> int:
        """Replicas training together (across workers). Inside a replica of a
        Keras `train_step`, `test_step` or `predict_step` it reads 1: each
        replica computes its loss as one device would, and the strategy
        weighs the replicas by their shares of the batch (docs/data_parallel.md: "How
        losses count")."""
        extended = self.extended
        return extended.loss_weights.replicas_seen(extended._num_replicas_in_sync)

    @property
    def num_workers(self) -> int:
        """Number of worker processes training together (1 on one machine)."""
        return 1

    @property
    def worker_index(self) -> int:
        """This process's index among the workers (0 on one machine)."""
        return 0

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes checkpoints and logs (worker 0)."""
        return True

    def communication_stats(self) -> dict:
        """Bytes each replica puts into the collectives of a training step:
        every one the step runs — the gradients' all-reduces or
        reduce-scatters, the all-gathers and broadcasts of weights the
        sharding modes add, the meetings of `sync_every` — not only the
        gradients'.

        Read after `fit` has run (or traced) a step; before, the counts are 0.
        Per-step figures are averages over the steps of an optimizer update:
        with `gradient_accumulation_steps=k` replicas accumulate locally and
        reduce once per update, and with `sync_every=H` they meet once every
        H updates, so a step sends 1/k (1/H) of an update's bytes. The
        exchanges of synchronized BatchNormalization's statistics and of
        metric results (a few numbers per channel and metric, through
        TensorFlow's reduction to one device) are not counted.

        Returns:
            A dict with
            - `bytes_per_step`: the total over every collective, the sum of
              the four kinds below (what each replica puts in: its buffer
              for an all-reduce or reduce-scatter, its part for an
              all-gather; a broadcast's value counts 1/N per replica, as
              one replica sends it).
            - `all_reduce_bytes_per_step`: all-reduces of the gradients
              (or of the weights' changes, at a meeting), as compressed.
            - `reduce_scatter_bytes_per_step`: reduce-scatters of the
              gradients (`sharding="gradients"`, `"parameters"`), as
              compressed.
            - `all_gather_bytes_per_step`: all-gathers of weight parts (the
              updated rows under the sharding modes; the split weights of
              `"parameters"` where layers use them), never compressed.
            - `broadcast_bytes_per_step`: weights and state updated on an
              owner device and sent to the other copies (the sharding
              modes' update of what is not split by rows), never compressed.
            - `ring_bytes_per_step`: what a replica sends when each
              collective runs as a ring (an all-reduce sends 2(N-1)/N of its
              buffer, a reduce-scatter (N-1)/N, an all-gather N-1 parts):
              the traffic to compare between modes.
            - `uncompressed_bytes_per_step`: `bytes_per_step` of the same
              step with `compression=None`; `fp32_bytes_per_step` is its
              former name, the same value.
            - `compression_ratio`: `bytes_per_step` over
              `uncompressed_bytes_per_step` (1.0 when nothing is sent).
            - `warmup_bytes_per_step`: the total on steps before compression
              starts (PowerSGD's warm-up); `bytes_per_step` without one.
            - `bytes_per_update`, `steps_per_update`: an update's total and
              the steps it takes.
            - `reductions`: all-reduces and reduce-scatters per update.
            - `reduction`, `compression`: their names.
            - `buckets`: one dict per collective of an update (label,
              tensors, elements, dtype, bytes, phase, kind).

        Example:

        ```python
        strategy = keras_parallel.DataParallel(compression="bf16")
        ...  # build and compile in strategy.scope()
        model.fit(x, y, epochs=1)
        stats = strategy.communication_stats()
        stats["compression_ratio"]  # 0.5: "auto" keeps no gather with it
        ```
        """
        stats = self.extended.gradient_reduction.communication_stats()
        steps = self.extended.steps_per_update
        per_update = stats["bytes_per_step"]
        if steps > 1:
            for key in stats:
                if key.endswith("_per_step"):
                    stats[key] /= steps
        return dict(stats, bytes_per_update=per_update, steps_per_update=steps)

    def save_own_variables(self, store) -> None:
        """Keras' saving hook: what the gradient compression keeps between
        steps (PowerSGD's error memory, warm start and step count), one
        entry per optimizer, goes into the checkpoint of every model built in
        this scope (`save_weights`, `ModelCheckpoint`, `BackupAndRestore`).

        Args:
            store: Keras' weights store of this object (a dict of arrays).
        """
        states = self.extended.gradient_reduction.states
        for index, arrays in enumerate(states.save(self._replica_total())):
            for name, array in arrays.items():
                store[f"{index}:{name}"] = array

    def _replica_total(self) -> Total | None:
        """How a save sums a state kept per replica: None, over this
        process's replicas (all of them on one machine)."""
        return None

    def load_own_variables(self, store) -> None:
        """Keras' loading hook: restores what `save_own_variables` saved.

        Args:
            store: Keras' weights store of this object (empty for a file saved
                without compression state).
        """
        saved: dict[int, dict[str, np.ndarray]] = {}
        for key in store.keys():
            index, name = key.split(":", 1)
            saved.setdefault(int(index), {})[name] = np.asarray(store[key])
        self.extended.gradient_reduction.states.restore(
            [saved[index] for index in sorted(saved)], self.num_workers
        )
