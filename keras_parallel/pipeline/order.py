"""Checks that a model's layers run in the order of their stages."""

from __future__ import annotations

import functools


class CallOrder:
    """Records which layers a model's first forward pass calls and raises if
    a layer runs after a layer of a later stage: the model then cannot be
    split into contiguous stages in its layer order (a subclassed model that
    calls its layers in another order than it creates them, or a layer
    shared between two places).

    Args:
        stages: `{id(layer): (stage index, device)}` for the placed layers.
    """

    def __init__(self, stages: dict[int, tuple[int, str]]):
        self._stages = stages
        self._calls: list | None = None
        self._checked = False

    def record(self, layer) -> None:
        if self._calls is not None and id(layer) in self._stages:
            self._calls.append(layer)

    def checked(self, call):
        """Wraps the model's call to check its first run."""

        @functools.wraps(call)
        def wrapped(*args, **kwargs):
            if self._checked:
                return call(*args, **kwargs)
            self._calls = []
            try:
                outputs = call(*args, **kwargs)
            finally:
                calls, self._calls = self._calls, None
            self._check(calls)
            self._checked = True
            return outputs

        return wrapped

    def _check(self, calls) -> None:
        latest = None
        for layer in calls:
            stage, device = self._stages[id(layer)]
            if latest is not None and stage < latest[1]:
                raise ValueError(
                    f"Layer {layer.name!r} (stage {stage}, {device}) runs after "
                    f"layer {latest[0].name!r} (stage {latest[1]}, {latest[2]}), "
                    "so the model cannot be split into stages in order: "
                    "PipelineParallel gives each device a contiguous run of "
                    "`model.layers`, and this model calls them in the order "
                    f"{[c.name for c in calls]}. Create the layers in the order "
                    "`call` uses them (and do not reuse a layer further on), "
                    "or pass `partition` as a dict from layer name to device."
                )
            latest = (layer, stage, device)
