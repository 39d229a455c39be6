"""`StepAccount`: every collective a traced training step runs, and what
`communication_stats()` reports of them.

The reduction engine records each collective it builds (a `Transfer`): the
gradients' all-reduces and reduce-scatters, compressed or not, the
all-gathers of weight parts and the broadcasts of updated weights that the
sharding modes add, and the meetings of `sync_every`. A step's account holds
them all, so that the total is what the step sends, not only its gradients.
"""

from __future__ import annotations

import contextlib

from keras_parallel.reduction.communicator import Transfer

# Kinds that sum gradients (or, in a meeting, weight changes): a compression
# acts on these; gathers and broadcasts carry weights as they are.
REDUCTIONS = ("all_reduce", "reduce_scatter")
KINDS = (*REDUCTIONS, "all_gather", "broadcast")


class StepAccount:
    """The collectives of the last traced training step.

    Outside `recording_step` each batch reduction is taken as one step's
    (the engine under `tf.distribute.MirroredStrategy`, which reduces once
    per step); a gather or broadcast there (a weight written by
    `set_weights`) is no training step's.
    """

    def __init__(self):
        self._last: list[Transfer] = []
        self._last_uncompressed = 0
        self._pending: list[Transfer] | None = None
        self._pending_uncompressed = 0
        self.replicas = 1

    def record(self, transfers, uncompressed: int = 0, replicas: int | None = None):
        """Adds collectives to the step.

        Args:
            transfers: The `Transfer`s.
            uncompressed: Bytes each replica would put into the reductions
                among them with `compression=None`.
            replicas: Replicas each collective spans, when known.
        """
        if replicas is not None:
            self.replicas = replicas
        if self._pending is not None:
            self._pending.extend(transfers)
            self._pending_uncompressed += uncompressed
        elif any(t.kind in REDUCTIONS for t in transfers):
            self._last, self._last_uncompressed = list(transfers), uncompressed

    @property
    def current(self) -> list[Transfer]:
        """The collectives of the step being traced (else of the last one)."""
        return list(self._last if self._pending is None else self._pending)

    @contextlib.contextmanager
    def recording_step(self):
        """Collects every collective recorded while a step is traced; they
        become the last step's if the step summed anything (a training
        step, not an evaluation's forward, which may gather weights)."""
        self._pending, self._pending_uncompressed = [], 0
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            if any(t.kind in REDUCTIONS for t in pending):
                self._last = pending
                self._last_uncompressed = self._pending_uncompressed

    def stats(self) -> dict:
        """Bytes per replica and step of the last step's collectives; see
        `GradientReduction.communication_stats` for the keys."""
        n = self.replicas
        every = [t for t in self._last if t.phase == "every step"]
        compressed = [t for t in self._last if t.phase == "compressed"]
        warmup = [t for t in self._last if t.phase == "warmup"] or compressed
        steady = every + compressed

        def put_in(transfers, kinds=KINDS):
            return sum(t.put_in(n) for t in transfers if t.kind in kinds)

        total = put_in(steady)
        uncompressed = self._last_uncompressed + put_in(
            every, ("all_gather", "broadcast")
        )
        return {
            "bytes_per_step": total,
            **{f"{kind}_bytes_per_step": put_in(steady, (kind,)) for kind in KINDS},
            "ring_bytes_per_step": sum(t.ring_bytes(n) for t in steady),
            "uncompressed_bytes_per_step": uncompressed,
            "fp32_bytes_per_step": uncompressed,
            "compression_ratio": total / uncompressed if uncompressed else 1.0,
            "warmup_bytes_per_step": put_in(every + warmup),
            "reductions": sum(t.kind in REDUCTIONS for t in steady),
        }

    @property
    def buckets(self) -> list[dict]:
        """One dict per collective of the last step."""
        return [vars(t) for t in self._last]
