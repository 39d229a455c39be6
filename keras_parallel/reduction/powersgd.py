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

import tensorflow as tf

from keras_parallel._tf_internal import local_variable
from keras_parallel._validation import check_int
from keras_parallel.reduction.compression import Compression


class PowerSGD(Compression):
    """Rank-`rank` PowerSGD with error feedback and warm start.

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
        self._state: dict = {}
        self._step = None

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

    def reduce(self, gradients, communicator):
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
        state = self._state_for(chosen, [shapes[k] for k in compressed])
        step = self._step_counter()

        def exact():
            with communicator.phase("warmup"):
                return communicator.bucketed_sum(chosen, label="warmup bucket")

        def approximate():
            with communicator.phase("compressed"):
                return self._power_step(chosen, state, communicator)

        if self.warmup_steps:
            sums = tf.cond(step < self.warmup_steps, exact, approximate)
        else:
            sums = approximate()
        with tf.control_dependencies(tf.nest.flatten(sums)):
            step.assign_add(1)
        for k, parts in zip(compressed, sums, strict=True):
            results[k] = parts
        return results

    def _power_step(self, gradients, state, communicator):
        replicas = range(communicator.num_replicas)
        matrices = []  # matrices[k][i]: M of gradient k on replica i
        for k, parts in enumerate(gradients):
            n, m = state[k]["shape"]
            row = []
            for i, part in enumerate(parts):
                with tf.device(part.device):
                    matrix = tf.reshape(part, [n, m])
                    if self.error_feedback:
                        matrix = matrix + state[k]["error"][i]
                    row.append(matrix)
            matrices.append(row)

        p_parts = self._products(
            matrices, lambda k, i, M: tf.matmul(M, state[k]["q"][i]), replicas
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
                    updates.append(state[k]["q"][i].assign(q_sums[k][i]))
                    if self.error_feedback:
                        # Replica i's share of what the sum's approximation
                        # missed: the sum runs over every worker's replicas.
                        share = approx / communicator.num_replicas_in_sync
                        residual = matrices[k][i] - share
                        updates.append(state[k]["error"][i].assign(residual))
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

    def _state_for(self, gradients, shapes):
        key = tuple((p[0].shape, p[0].dtype) for p in gradients)
        if key not in self._state:
            self._state[key] = [
                self._new_state(parts, shape, k)
                for k, (parts, shape) in enumerate(zip(gradients, shapes, strict=True))
            ]
        return self._state[key]

    def _new_state(self, parts, shape, index):
        n, m = shape
        rank = min(self.rank, n, m)
        q, error = [], []
        with tf.init_scope():
            initial_q = tf.random.stateless_normal(
                [m, rank], seed=[self.seed, index], dtype=parts[0].dtype
            )
            for part in parts:
                with tf.device(part.device):
                    q.append(local_variable(initial_q, f"powersgd_q_{index}"))
                    if self.error_feedback:
                        error.append(
                            local_variable(
                                tf.zeros([n, m], part.dtype), f"powersgd_error_{index}"
                            )
                        )
        return {"shape": (n, m), "q": q, "error": error}

    def _step_counter(self):
        if self._step is None:
            with tf.init_scope():
                self._step = local_variable(tf.constant(0, tf.int64), "powersgd_step")
        return self._step


def _on(tensor, fn):
    with tf.device(tensor.device):
        return fn(tensor)


def _orthonormalise(p):
    q, _ = tf.linalg.qr(p)
    return q
