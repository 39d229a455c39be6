"""`PipelineParallel`: a model's layers split into stages, one per device."""

from __future__ import annotations

import collections
import contextlib
import functools
import warnings
import weakref
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from keras_parallel import placement
from keras_parallel._tf_internal import (
    OneDeviceExtended,
    UpdateContext,
    registered_gradient_names,
    sublayers,
    unregister_gradients,
)
from keras_parallel._validation import check_int
from keras_parallel.devices import resolve_devices, short_device
from keras_parallel.pipeline import microbatch
from keras_parallel.pipeline.arguments import (
    check_partition,
    check_recompute,
    recomputing_stages,
)
from keras_parallel.pipeline.microbatch import check_first_batch
from keras_parallel.pipeline.order import StageFlow
from keras_parallel.pipeline.plan import plan_devices
from keras_parallel.pipeline.schedule import schedule_named
from keras_parallel.pipeline.split_step import (
    batch_size,
    by_batch_size,
    run_split,
    step_objects,
)
from keras_parallel.pipeline.stage_calls import StagedLayer, StagedModel
from keras_parallel.pipeline.step_trace import StepTrace
from keras_parallel.scope_errors import explained, made_outside
from keras_parallel.specialize import (
    captured_model,
    keras_step,
    specialized,
    step_model,
)
from keras_parallel.xla import (
    check_jit_compile,
    compiled_per_device,
    compiles,
    refuse_whole_step_xla,
)

HOST = "/device:CPU:0"


class PipelineParallel(tf.distribute.Strategy):
    """Splits a model's layers into contiguous stages, one per device.

    Build and compile the model in `strategy.scope()`, then call the usual
    `fit`, `evaluate` and `predict`. Weights are created in host memory;
    before the model's first step (or at `place(model)`) each layer is
    assigned a device: its weights move there, its optimizer slots and
    updates are kept there, and its forward and backward ops run there. With
    `num_microbatches > 1` each batch flows through the stages in pieces, so
    that the devices work at the same time (GPipe's schedule).

    Args:
        devices: The devices, one stage each, in order (`"GPU:0"`,
            `"/device:CPU:1"`, ...). None means all GPUs, or all logical
            CPUs when there is no GPU.
        num_microbatches: Pieces each batch is cut into. The batch size must
            be a multiple of it; the last batch (or the only one, as in a
            `predict` on a few samples) is cut as evenly as possible, and
            pieces left without samples are skipped. BatchNormalization
            then normalises each piece with its own statistics and updates
            its moving statistics once per non-empty piece, as in GPipe.
        partition: `"auto"` (contiguous stages balancing the bytes of
            weights plus optimizer slots, in the order the model's data
            flows through its layers), `"time"` (the same, balancing each
            layer's forward and backward time, measured at placement on a
            generated batch of 32 shaped like a Functional or Sequential
            model's inputs; the model's weights, statistics and random
            state are left as they were), a list with the number of layers of
            each stage (in that order: `model.layers` for Sequential and
            subclassed models, Keras' call order for a Functional graph),
            or a dict from layer name to device (layers not named stay on
            the device of the layer before them in `model.layers`). Layers
            wrapped in `keras_parallel.layers.OnDevice` keep their device.
            A placement whose data flows around a cycle of devices is
            refused at the first step.
        schedule: The order of the micro-batches' forwards and backwards
            (`pipeline/schedule.py`). `"gpipe"`: all forwards, then all
            backwards, with the loss of the whole batch; each stage holds
            the activations of every micro-batch. `"1f1b"`: one forward and
            one backward in turn once the pipeline is full, so that stage s
            of p holds at most p - s micro-batches; the training step then
            runs once per micro-batch (each loss weighted by its share) and
            the optimizer once, on the summed gradients. A `train_step` that
            applies gradients twice (a GAN) needs `"gpipe"`. Evaluation and
            prediction run forwards only and cut the model's call either way.
        recompute: Whether a stage keeps only its inputs for the backward
            and computes its layers' activations again there
            (`pipeline/recompute.py`): `False`, `True` (every stage; a
            warning names a stage with fewer than two layers to recompute,
            where it saves little), or `"auto"` (the stages with at least
            two layers to recompute).
            Layers with non-trainable state (BatchNormalization, Dropout's
            seed) are not recomputed, so that their state moves once.
        jit_compile: Whether each stage's ops run compiled by XLA on its
            device, the transfers between stages outside
            (`keras_parallel/xla.py`): True, False, or `"auto"` (default: on
            GPUs, when every layer supports XLA). Use it rather than
            `model.compile(jit_compile=True)`, which compiles the whole step
            for one device (an error says so).

    Example:

    ```python
    strategy = keras_parallel.PipelineParallel(
        num_microbatches=8, schedule="1f1b", recompute=True
    )
    with strategy.scope():
        model = keras.Sequential([...])
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=256)
    print(keras_parallel.placement_report(model))
    ```
    """

    def __init__(
        self,
        devices: str | Sequence[str] | None = None,
        num_microbatches: int = 1,
        partition: str | Sequence[int] | Mapping[str, str] = "auto",
        *,
        schedule: str = "gpipe",
        recompute: bool | str = False,
        jit_compile: bool | str = "auto",
    ):
        check_int("num_microbatches", num_microbatches, 1)
        devices = resolve_devices(devices)
        check_partition(partition, devices)
        check_recompute(recompute)
        super().__init__(
            PipelineParallelExtended(
                self,
                devices,
                num_microbatches,
                partition,
                schedule_named(schedule),
                recompute,
                check_jit_compile(jit_compile),
            )
        )

    def scope(self) -> contextlib.AbstractContextManager:
        """`tf.distribute.Strategy.scope`: models and optimizers made in it
        are placed by this strategy. A model without `call()` trains as on
        one device, and an optimizer made outside the scope gets an error
        naming it and the fix (`keras_parallel.scope_errors`).

        Returns:
            A context manager.
        """
        return explained(super().scope())

    def place(self, model: keras.Model) -> None:
        """Assigns the model's layers to devices now (otherwise done before
        its first `fit`, `evaluate` or `predict` step). Placing twice does
        nothing."""
        self.extended.place(model)

    @property
    def stage_devices(self) -> tuple[str, ...]:
        """The devices, one stage each, in order."""
        return self.extended.devices

    def __repr__(self) -> str:
        devices = ", ".join(short_device(d) for d in self.stage_devices)
        extended = self.extended
        return (
            f"{type(self).__name__}(devices=[{devices}], "
            f"num_microbatches={extended.num_microbatches}, "
            f"schedule={extended.schedule.name!r}, recompute={extended.recompute!r})"
        )


class ModelParallel(PipelineParallel):
    """Deprecated name of `PipelineParallel`, kept for one release.

    Renamed because `keras.distribution.ModelParallel` means sharding weights
    by layouts, not layer stages.
    """

    def __init__(self, *args, **kwargs):
        warnings.warn(
            "keras_parallel.ModelParallel is now keras_parallel.PipelineParallel "
            "(same arguments); the old name will be removed in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)


class PipelineParallelExtended(OneDeviceExtended):
    """One replica; inputs, losses and metrics on the first device, each
    layer's weights, slots, forward and backward on its stage's."""

    def __init__(
        self,
        container_strategy,
        devices,
        num_microbatches,
        partition,
        schedule,
        recompute,
        jit_compile,
    ):
        super().__init__(container_strategy, devices[0])
        self.devices = tuple(devices)
        self.num_microbatches = num_microbatches
        self.partition = partition
        self.schedule = schedule
        self.recompute = recompute
        self.jit_compile = jit_compile
        # Placed model -> the stages that recompute; the step being traced.
        self._recomputing: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._trace: StepTrace | None = None
        self.split_step = None
        # Placed model -> its StageFlow; placed layer -> (device, StageFlow).
        # Neither holds a model: a model must be free to go (see
        # `_call_for_each_replica`).
        self._placed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Every variable made in the scope, by id (variables are not
        # hashable): an update of another is refused.
        self._created: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._layer_devices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # (slot, the variable it serves) for slots created before placement,
        # which move with their variable.
        self._slots: list[tuple[tf.Variable, tf.Variable]] = []

    def _create_variable(self, next_creator, **kwargs):
        colocate_with = kwargs.pop("colocate_with", None)
        if colocate_with is None:
            # In host memory until placement, so that building a model larger
            # than one accelerator does not fill the first one.
            with tf.device(HOST):
                variable = next_creator(**kwargs)
        else:
            with tf.device(colocate_with.device):
                variable = next_creator(**kwargs)
            self._slots.append((variable, colocate_with))
        self._created[id(variable)] = variable
        return variable

    def _experimental_distribute_dataset(self, dataset, options):
        if self.num_microbatches > 1:
            check_first_batch(dataset, self.num_microbatches)
        # The dataset itself, as on one device: OneDeviceStrategy's version
        # prefetches to the device, and a new one each epoch drops the batch
        # it fetched ahead; from a Python generator that batch is lost.
        return dataset

    def _call_for_each_replica(self, fn, args, kwargs):
        refuse_whole_step_xla("PipelineParallel")
        model = step_model(fn) or captured_model(fn)
        if model is None:
            return super()._call_for_each_replica(fn, args, kwargs)
        self.place(model)
        xla = compiles(self.jit_compile, self.devices, [model])
        layers = [
            layer
            for layer in placement.stage_layers(model)
            if layer in self._layer_devices
        ]
        # Tracing a step, each placed layer's `tf.custom_gradient`
        # (`placement.run_on`) registers its gradient function in
        # TensorFlow's global registry for good, and that function holds the
        # variables it read, so the variables, the strategy and the traced
        # graphs (with the native thread pool Keras' traced evaluate step
        # keeps) would outlive the model. They go when the model goes.
        registered = registered_gradient_names()
        found = keras_step(fn)
        try:
            with (
                specialized(layers, StagedLayer),
                specialized([model], StagedModel),
                compiled_per_device(xla, transfers=True),
            ):
                if found is not None and found[1] == "train_step":
                    step = functools.partial(self._training_step, model, fn, xla)
                    return super()._call_for_each_replica(step, args, kwargs)
                # Forwards only, or a custom loop: the model's call is cut,
                # its pieces in no order and kept by tapes.
                self._trace = StepTrace(self.schedule, frozenset(), self.devices)
                return super()._call_for_each_replica(fn, args, kwargs)
        finally:
            self._trace = None
            added = registered_gradient_names() - registered
            if added:
                weakref.finalize(model, unregister_gradients, added)

    def _training_step(self, model, fn, xla, *args, **kwargs):
        """Keras' training step under the schedule, the stages recomputing;
        a batch with fewer samples than micro-batches (a short last batch)
        runs as under GPipe, without recomputation. With `xla`, each branch
        of the step is compiled per device (a `tf.cond`'s branches are
        graphs of their own)."""
        splits = self.schedule.splits_step and self.num_microbatches > 1

        @compiled_per_device(xla, transfers=True)
        def full():
            self._trace = StepTrace(
                self.schedule,
                self._recomputing[model],
                self.devices,
                cut=not splits,
                full=True,
            )
            if splits:
                objects = step_objects(model)
                return run_split(
                    fn, args, kwargs, self.num_microbatches, self._trace, objects
                )
            return fn(*args, **kwargs)

        @compiled_per_device(xla, transfers=True)
        def short():
            # Recomputing inside the empty pieces' conds would read the
            # variables again in the cond's gradient, which TensorFlow's
            # cond_v2 refuses.
            self._trace = StepTrace(self.schedule, frozenset(), self.devices)
            return fn(*args, **kwargs)

        return by_batch_size(
            batch_size(args, kwargs), self.num_microbatches, full, short
        )

    def colocate_vars_with(self, colocate_with_variable):
        # Keras' optimizer builds its slots through this scope of the strategy
        # it was made in; outside this strategy's scope (a model built outside
        # it, whose `fit` enters its own) TensorFlow's error names no fix.
        if tf.distribute.get_strategy() is not self._container_strategy():
            raise ValueError(made_outside(colocate_with_variable, "PipelineParallel"))
        return super().colocate_vars_with(colocate_with_variable)

    def layer_call(self, layer, call):
        """`call` (the layer's own) running on the layer's device, forward
        and backward."""
        placed = self._layer_devices.get(layer)
        if placed is None:
            return call
        device, flow = placed
        if self._trace is None:  # a call outside a step (the model called eagerly)
            return flow.recorded(layer, placement.run_on(call, device))
        stage = self.devices.index(device)
        return flow.recorded(layer, self._trace.stage_call(layer, call, device, stage))

    def model_call(self, model, call):
        """`call` (the model's own) with micro-batches and, on its first run,
        the check that data does not flow around a cycle of stage devices."""
        call = self._placed[model].checked(call)
        trace = self._trace
        if self.num_microbatches > 1 and (trace is None or trace.cut):
            call = microbatch.microbatched(
                call,
                self.num_microbatches,
                [model, *sublayers(model)],
                piece=None if trace is None else trace.piece,
                full=trace is not None and trace.full,
            )
        return call

    def _update(self, var, fn, args, kwargs, group):
        if self._created.get(id(var)) is not var:
            # An optimizer made in the scope updating a model made outside it:
            # the model would train on one device, unplaced.
            raise ValueError(made_outside(var, "PipelineParallel"))
        # The optimizer's update runs where the variable and its slots are.
        device = var.device
        with tf.device(device), UpdateContext(device):
            result = fn(var, *args, **kwargs)
        if group:
            return result
        return tf.nest.map_structure(self._local_results, result)

    def place(self, model: keras.Model) -> None:
        if model in self._placed:
            return
        layers = placement.stage_layers(model)
        slot_bytes: dict[int, int] = collections.Counter()
        for slot, owner in self._slots:
            slot_bytes[id(owner)] += placement.variable_bytes(slot)
        devices = plan_devices(model, layers, self.devices, self.partition, slot_bytes)
        stage_index = {d: i for i, d in enumerate(self.devices)}
        # Layers placing themselves may sit anywhere: only the others are checked.
        flow = StageFlow(
            {
                id(layer): (stage_index[d], short_device(d))
                for layer, d in zip(layers, devices, strict=True)
                if d in stage_index and not placement.places_itself(layer)
            },
            given=f"partition={self.partition!r} over the devices "
            f"{[short_device(d) for d in self.devices]}",
        )
        device_of = {}
        for layer, device in zip(layers, devices, strict=True):
            if placement.places_itself(layer):
                continue  # its slots were created beside its weights
            for variable in layer.variables:
                device_of[id(variable.value)] = device
            placement.move_layer(layer, device)
            self._layer_devices[layer] = (device, flow)
        optimizer = getattr(model, "optimizer", None)  # None before compile
        if optimizer is not None:
            moved = {id(slot): id(owner) for slot, owner in self._slots}
            for slot in optimizer.variables:
                owner = moved.get(id(slot.value))
                if owner in device_of:
                    placement.move_variable(slot, device_of[owner])
        # Slots created from now on are colocated with moved variables.
        self._slots = [(s, o) for s, o in self._slots if id(o) not in device_of]
        self._placed[model] = flow
        self._recomputing[model] = recomputing_stages(
            layers, devices, self.devices, self.recompute
        )
        # Moving gave the variables new storage, made outside `_create_variable`.
        optimizer_variables = [] if optimizer is None else optimizer.variables
        for variable in [*model.variables, *optimizer_variables]:
            self._created[id(variable.value)] = variable.value
