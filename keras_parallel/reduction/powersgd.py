"""PowerSGD: low-rank gradient compression with error feedback.

Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019. Each gradient of two
or more dimensions is viewed as an n x m matrix M (a kernel of shape
(h, w, in, out) as (h*w*in, out)). With Q (m x r) kept from the previous step
(warm start), one step of power iteration sends two small matrices instead of
M:

    P = sum_i M_i Q            (all-reduce of n x r)
    P = orthonormalise(P)
    Q = sum_i M_i^T P          (all-reduce of m x r)
    sum_i M_i  ~=  P Q^T

Each replica keeps what the approximation missed (error feedback) and adds it
to its next gradient, so nothing is lost, only delayed. Tensors for which
P and Q would not be at least `min_compression_rate` times smaller than M
(biases, normalisation scales, thin matrices) are summed uncompressed, fused
into buckets.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from keras_parallel._tf_internal import local_variable
from keras_parallel._validation import check_int
from keras_parallel.reduction.compression import Compression, CompressionState, Total

# Marks a saved state whose errors are summed over every worker's replicas.
ALL_WORKERS = "errors_of_all_workers"


class PowerSGD(Compression):
    """Rank-`rank` PowerSGD with error feedback and warm start.

    The object holds settings only: what PowerSGD remembers between steps is
    a `PowerSGDState` per strategy and optimizer (`new_state`), saved with the
    model by `save_weights`, `model.save`, `ModelCheckpoint` and
    `BackupAndRestore`. One object can serve several strategies and models.

    Args:
        rank: Rank of the approximation, at least 1.
        warmup_steps: Steps reduced uncompressed before compression starts
            (the paper's and PyTorch's advice: let the gradients settle).
        error_feedback: Add each replica's approximation error to its next
            gradient. Only for experiments: without it PowerSGD is biased.
        min_compression_rate: Compress a matrix only when n*m >= this times
            (n+m)*rank.
        transfer_dtype: Dtype P and Q travel in: None (the gradient's own),
            `"float16"` or `"bfloat16"`, which halve the bytes again (as
            PyTorch's `fp16_compress_wrapper` around its PowerSGD hook).
        seed: Seed of the initial Q, the same on every replica.

    Example:

    ```python
    strategy = keras_parallel.DataParallel(
        compression=keras_parallel.PowerSGD(rank=4, warmup_steps=20)
    )
    ```
    """

    def __init__(
        self,
        rank: int = 4,
        warmup_steps: int = 0,
        error_feedback: bool = True,
        min_compression_rate: float = 2.0,
        transfer_dtype: str | None = None,
        seed: int = 0,
    ):
        check_int("rank", rank, 1)
        check_int("warmup_steps", warmup_steps, 0)
        if transfer_dtype not in (None, "float16", "bfloat16"):
            raise ValueError(
                "`transfer_dtype` must be None, 'float16' or 'bfloat16'. "
                f"Received: transfer_dtype={transfer_dtype!r}"
            )
        self.rank = rank
        self.warmup_steps = warmup_steps
        self.error_feedback = error_feedback
        self.min_compression_rate = min_compression_rate
        self.transfer_dtype = (
            None if transfer_dtype is None else tf.as_dtype(transfer_dtype)
        )
        self.seed = seed
        self.name = f"PowerSGD(rank={rank})"

    def __repr__(self) -> str:
        return (
            f"PowerSGD(rank={self.rank}, warmup_steps={self.warmup_steps}, "
            f"error_feedback={self.error_feedback})"
        )

    def matrix_shape(self, shape: tf.TensorShape) -> tuple[int, int] | None:
        """(n, m) of the matrix a gradient is compressed as, or None when it
        is summed uncompressed."""
        if shape.rank is None or shape.rank < 2:
            return None
        m = shape[-1]
        n = shape.num_elements() // m
        if n * m < self.min_compression_rate * (n + m) * min(self.rank, n, m):
            return None
        return n, m

    def new_state(self) -> PowerSGDState:
        return PowerSGDState(self)

    def reduce(self, gradients, communicator, state=None):
        if state is None:
            raise ValueError(
                "PowerSGD keeps state between steps: pass the state made by "
                "`new_state()` (DataParallel keeps one per optimizer)."
            )
        shapes = [self.matrix_shape(parts[0].shape) for parts in gradients]
        compressed = [k for k, s in enumerate(shapes) if s is not None]
        plain = [k for k, s in enumerate(shapes) if s is None]
        results = [None] * len(gradients)
        if plain:
            sums = communicator.bucketed_sum([gradients[k] for k in plain])
            for k, parts in zip(plain, sums, strict=True):
                results[k] = parts
        if not compressed:
            return results
        chosen = [gradients[k] for k in compressed]
        step = state.step()
        entries = state.matrices(chosen, [shapes[k] for k in compressed])

        def exact():
            with communicator.phase("warmup"):
                return communicator.bucketed_sum(chosen, label="warmup bucket")

        def approximate():
            with communicator.phase("compressed"):
                return self._power_step(chosen, entries, communicator)

        if self.warmup_steps:
            sums = tf.cond(step < self.warmup_steps, exact, approximate)
        else:
            sums = approximate()
        with tf.control_dependencies(tf.nest.flatten(sums)):
            step.assign_add(1)
        for k, parts in zip(compressed, sums, strict=True):
            results[k] = parts
        return results

    def _power_step(self, gradients, entries, communicator):
        replicas = range(communicator.num_replicas)
        matrices = []  # matrices[k][i]: M of gradient k on replica i
        for k, parts in enumerate(gradients):
            n, m = entries[k]["shape"]
            row = []
            for i, part in enumerate(parts):
                with tf.device(part.device):
                    matrix = tf.reshape(part, [n, m])
                    if self.error_feedback:
                        matrix = matrix + entries[k]["error"][i]
                    row.append(matrix)
            matrices.append(row)

        p_parts = self._products(
            matrices, lambda k, i, M: tf.matmul(M, entries[k]["q"][i]), replicas
        )
        p_sums = self._sum_all(p_parts, communicator, "powersgd P")
        orthonormal = [
            [_on(p_sums[k][i], lambda x: _orthonormalise(x)) for i in replicas]
            for k in range(len(gradients))
        ]
        q_parts = self._products(
            matrices,
            lambda k, i, M: tf.matmul(M, orthonormal[k][i], transpose_a=True),
            replicas,
        )
        q_sums = self._sum_all(q_parts, communicator, "powersgd Q")

        results = []
        updates = []
        for k, parts in enumerate(gradients):
            row = []
            for i, part in enumerate(parts):
                with tf.device(part.device):
                    approx = tf.matmul(
                        orthonormal[k][i], q_sums[k][i], transpose_b=True
                    )
                    updates.append(entries[k]["q"][i].assign(q_sums[k][i]))
                    if self.error_feedback:
                        # Replica i's share of what the sum's approximation
                        # missed: the sum runs over every worker's replicas.
                        share = approx / communicator.num_replicas_in_sync
                        residual = matrices[k][i] - share
                        updates.append(entries[k]["error"][i].assign(residual))
                    row.append(tf.reshape(approx, part.shape))
            results.append(row)
        with tf.control_dependencies(updates):
            return [[tf.identity(x) for x in row] for row in results]

    @staticmethod
    def _products(matrices, product, replicas):
        return [
            [
                _on(matrices[k][i], lambda M, k=k, i=i: product(k, i, M))
                for i in replicas
            ]
            for k in range(len(matrices))
        ]

    def _sum_all(self, parts, communicator, label):
        """All P's (or Q's) of a step travel fused in buckets."""
        return communicator.bucketed_sum(
            parts, wire_dtype=self.transfer_dtype, label=label
        )


class PowerSGDState(CompressionState):
    """PowerSGD's memory for one optimizer of one strategy: per compressed
    gradient the warm-start Q and each replica's error, and a step counter.

    Made on the devices of the gradients it first sees (the strategy's). Saved
    as `step`, `q_<g>_<k>` and `error_<g>_<k>`, where the error is the sum
    over this process's replicas, or over every worker's (then
    `errors_of_all_workers` is 1) when all workers save at once: only the
    sum over all replicas enters the next steps (P, Q and the approximation
    are linear in the replicas' summed matrices), so restoring it split
    evenly over the replicas continues exactly, on any number of devices.
    """

    def __init__(self, compression: PowerSGD):
        self._compression = compression
        self._step = None
        # One group per set of compressed gradients, each a list of
        # {"shape", "q": [per replica], "error": [per replica]}.
        self._groups: dict = {}
        self._pending: dict[str, np.ndarray] = {}
        self._sharing_workers = 1

    def step(self) -> tf.Variable:
        """Steps reduced so far (warm-up included)."""
        if self._step is None:
            with tf.init_scope():
                self._step = local_variable(tf.constant(0, tf.int64), "powersgd_step")
                self._take_pending()
        return self._step

    def matrices(self, gradients, shapes) -> list[dict]:
        """The Q and error variables of these gradients (made on first use)."""
        key = tuple((p[0].shape, p[0].dtype) for p in gradients)
        if key not in self._groups:
            self._groups[key] = [
                self._new_matrix(parts, shape, k)
                for k, (parts, shape) in enumerate(zip(gradients, shapes, strict=True))
            ]
            with tf.init_scope():
                self._take_pending()
        return self._groups[key]

    def _new_matrix(self, parts, shape, index):
        n, m = shape
        rank = min(self._compression.rank, n, m)
        dtype = parts[0].dtype
        with tf.init_scope():
            seed = [self._compression.seed, index]
            q = tf.random.stateless_normal([m, rank], seed=seed, dtype=dtype)
            entry = {"shape": (n, m), "q": [], "error": []}
            for part in parts:
                with tf.device(part.device):
                    entry["q"].append(local_variable(q, f"powersgd_q_{index}"))
                    if self._compression.error_feedback:
                        entry["error"].append(
                            local_variable(
                                tf.zeros([n, m], dtype), f"powersgd_error_{index}"
                            )
                        )
        return entry

    def arrays(self, total: Total | None = None) -> dict[str, np.ndarray]:
        arrays = dict(self._pending)
        if self._step is not None:
            arrays["step"] = self._step.numpy()
        for group, entries in enumerate(self._groups.values()):
            for k, entry in enumerate(entries):
                arrays[f"q_{group}_{k}"] = entry["q"][0].numpy()
                if entry["error"]:
                    arrays[f"error_{group}_{k}"] = (total or _local_total)(
                        entry["error"]
                    )
        if total is not None and self._groups:
            arrays[ALL_WORKERS] = np.array(1)
        return arrays

    def restore(self, arrays: Mapping[str, np.ndarray], workers: int = 1) -> None:
        self._pending = {name: np.asarray(value) for name, value in arrays.items()}
        # A sum over every worker's replicas is shared among all of them.
        self._sharing_workers = workers if self._pending.pop(ALL_WORKERS, 0) else 1
        self._take_pending()

    def _take_pending(self) -> None:
        """Assigns the restored arrays whose variables exist; the rest waits
        for the variables it belongs to."""
        if self._step is not None and "step" in self._pending:
            self._step.assign(self._pending.pop("step"))
        for group, entries in enumerate(self._groups.values()):
            for k, entry in enumerate(entries):
                n, m = entry["shape"]
                q = self._pending.pop(f"q_{group}_{k}", None)
                if q is not None:
                    _check_shape(f"q_{group}_{k}", q, entry["q"][0].shape)
                    for variable in entry["q"]:
                        variable.assign(q)
                error = self._pending.pop(f"error_{group}_{k}", None)
                if error is not None and entry["error"]:
                    _check_shape(f"error_{group}_{k}", error, (n, m))
                    replicas = len(entry["error"]) * self._sharing_workers
                    for variable in entry["error"]:
                        variable.assign(error / replicas)


def _local_total(variables: list[tf.Variable]) -> np.ndarray:
    return sum(variable.numpy() for variable in variables)


def _check_shape(name, array, shape) -> None:
    if tuple(np.shape(array)) != tuple(shape):
        raise ValueError(
            f"The PowerSGD state `{name}` being restored has shape "
            f"{tuple(np.shape(array))}, but this model's gradient needs "
            f"{tuple(shape)}: the checkpoint is of another model or another "
            "PowerSGD rank. Restore it into the model it was saved from."
        )


def _on(tensor, fn):
    with tf.device(tensor.device):
        return fn(tensor)


def _orthonormalise(p):
    q, _ = tf.linalg.qr(p)
    return q
