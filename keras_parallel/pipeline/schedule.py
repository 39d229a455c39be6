"""The order in which a stage runs its micro-batches' forwards and backwards.

A schedule is one policy object chosen at construction. It says whether the
model's call or the whole training step is cut into micro-batches, and what
each stage's forward of micro-batch i waits for; the waits are control
dependencies in the traced graph (`step_trace.StepTrace`), so the order
holds whatever TensorFlow's executor would otherwise pick.

With p stages and m micro-batches both schedules idle a stage for the same
fraction of a step, (p - 1) / (m + p - 1) (the bubble); they differ in what
a stage holds (Narayanan et al., 2021, PipeDream-Flush; Megatron-LM's
default):

- GPipe (Huang et al., 2019) runs every forward, then every backward: the
  loss is the whole batch's, as on one device, and each stage holds the
  activations of all m micro-batches at once.
- 1F1B runs, once the pipeline is full, one forward and one backward in
  turn: stage s holds at most p - s micro-batches, but each micro-batch
  needs a loss and a backward of its own, so the training step runs once
  per micro-batch and the optimizer once, on the sum of their gradients.
"""

from __future__ import annotations


class Schedule:
    """A pipeline schedule (see the module docstring).

    Attributes:
        name: The value of `PipelineParallel(schedule=...)`.
        splits_step: Whether the training step runs once per micro-batch
            (else the model's call is cut, and the step runs once).
    """

    name = ""
    splits_step = False

    def in_flight(self, stage: int, num_stages: int) -> int | None:
        """The most micro-batches whose forward stage `stage` may have run
        before their backward, or None for no bound."""
        return None


class GPipe(Schedule):
    """Every forward, then every backward; the loss of the whole batch."""

    name = "gpipe"


class OneFOneB(Schedule):
    """One forward, one backward, once the pipeline is full."""

    name = "1f1b"
    splits_step = True

    def in_flight(self, stage: int, num_stages: int) -> int:
        return num_stages - stage


SCHEDULES = {schedule.name: schedule for schedule in (GPipe, OneFOneB)}


def schedule_named(name) -> Schedule:
    """The schedule `PipelineParallel(schedule=name)` asks for.

    Raises:
        ValueError: `name` is not one of `SCHEDULES`.
    """
    if name not in SCHEDULES:
        raise ValueError(
            f"`schedule` must be one of {sorted(SCHEDULES)}: 'gpipe' runs all "
            "forwards then all backwards, '1f1b' one forward and one backward "
            f"in turn (less memory). Received: schedule={name!r}"
        )
    return SCHEDULES[name]()
