"""How long each stage unit's layers take forward and backward, measured,
for `partition="time"`: a convolution with few weights but many
multiplications weighs what it costs, not its bytes.

Placement happens while the strategy traces the first step, so measuring
leaves that trace (`tf.init_scope`) and runs on a generated batch shaped like
the model's inputs, in training mode as the train step does (Dropout and
BatchNormalization cost what they cost there). That mode advances moving
statistics and seed generators, so the model's non-trainable variables and
Keras' global seed state are written back bit for bit; trainable weights are
only read, and a layer creating a variable is refused.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_parallel._tf_internal import TakenLosses, global_seed_state, sublayers
from keras_parallel.sample_data import sample_inputs
from keras_parallel.specialize import specialized


def unit_times(
    model: keras.Model,
    units: Sequence[Sequence[keras.layers.Layer]],
    device: str,
    repeats: int = 10,
) -> list[float]:
    """Seconds each unit's layers take forward and backward on one batch.

    Args:
        model: A built Functional or Sequential model (`sample_data`).
        units: Groups of the model's layers (`units.stage_units`).
        device: Where the layers run while measured.
        repeats: Timed runs per unit after an untimed one.

    Returns:
        Per unit, in order, the median time of the calls its layers make in
        one run of the model, with the gradients with respect to the calls'
        inputs and the layers' trainable weights (0 if never called).

    Raises:
        ValueError: a model without known inputs, or a layer creating a
            variable when called.
    """
    layers = [layer for unit in units for layer in unit]
    with (
        tf.init_scope(),
        tf.device(device),
        tf.variable_creator_scope(_refuse_variable),
        _state_kept(model),
        TakenLosses([model, *sublayers(model)]),  # activity regularizers' losses
    ):
        try:
            inputs = sample_inputs(model)
        except ValueError:
            raise ValueError(
                f"partition='time' times layers on a batch shaped like the model's "
                f"inputs, but Keras knows none of {model.name!r}'s. Use a Functional "
                "or Sequential model, or partition='auto' or a list of stage sizes."
            ) from None
        calls = _recorded_calls(model, layers, inputs)
        return [
            _median_seconds([c for c in calls if any(c[0] is u for u in unit)], repeats)
            for unit in units
        ]


class Profiled:
    """Mixed in before a layer's class: records what its `call` receives."""

    calls: list | None = None

    def call(self, *args, **kwargs):
        if Profiled.calls is not None:
            Profiled.calls.append((self, args, kwargs))
        return super().call(*args, **kwargs)


def _recorded_calls(model: keras.Model, layers: list, inputs) -> list[tuple]:
    """`(layer, args, kwargs)` of each call of `layers` in a training run of
    `model` on `inputs`, with Keras' casts, masks and `training` applied."""
    Profiled.calls = calls = []
    try:
        with specialized(layers, Profiled):
            model(inputs, training=True)
    finally:
        Profiled.calls = None
    return calls


def _median_seconds(calls: list[tuple], repeats: int) -> float:
    """Median seconds of `calls` forward and backward in one tf.function (no
    Python per op, as in the traced step) less a tf.function's that only
    reads the inputs: that fixed cost (about 1 ms on CPU) is not in the
    traced step, and would make each cheap layer weigh like a convolution."""
    if not calls:
        return 0.0
    inputs = [_tensors((args, kwargs)) for _, args, kwargs in calls]

    @tf.function(autograph=False)
    def run(inputs):
        done = []
        for call, tensors in zip(calls, inputs, strict=True):
            done += _forward_backward(*call, tensors)
        return _read_one_number(done)

    @tf.function(autograph=False)
    def baseline(inputs):
        return _read_one_number([x for xs in inputs for x in xs if x.dtype.is_floating])

    # The first round (untimed) traces; taking turns, a slow spell hits both.
    differences = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        baseline(inputs).numpy()
        middle = time.perf_counter()
        run(inputs).numpy()
        differences.append(time.perf_counter() - 2 * middle + start)
    return max(0.0, statistics.median(differences[1:]))


def _forward_backward(layer, args, kwargs, tensors: list) -> list:
    """`layer`'s outputs on `tensors` (in place of the arguments' tensors),
    and their gradients."""
    feed = iter(tensors)
    flat = tf.nest.flatten((args, kwargs))
    values = [next(feed) if isinstance(x, tf.Tensor) else x for x in flat]
    floats = [x for x in tensors if x.dtype.is_floating]
    with tf.GradientTape() as tape:
        tape.watch(floats)
        args, kwargs = tf.nest.pack_sequence_as((args, kwargs), values)
        targets = [y for y in _tensors(layer(*args, **kwargs)) if y.dtype.is_floating]
    # TensorFlow's variables: a Keras variable's dtype, a string, fails ZERO.
    sources = floats + [v.value for v in layer.trainable_variables]
    return targets + tape.gradient(targets, sources, unconnected_gradients="zero")


def _read_one_number(tensors: list) -> tf.Tensor:
    """A number read from each of `tensors`: fetching it waits for all their
    ops without copying them (control dependencies let grappler prune)."""
    firsts = [tf.cast(tf.reshape(x, [-1])[:1], tf.float32) for x in tensors]
    return tf.add_n([tf.constant(0.0)] + [tf.reduce_sum(x) for x in firsts])


def _tensors(nest) -> list[tf.Tensor]:
    return [x for x in tf.nest.flatten(nest) if isinstance(x, tf.Tensor)]


def _refuse_variable(next_creator, **kwargs):
    raise ValueError(
        f"partition='time' times the model's layers, and one of them created "
        f"a variable ({kwargs.get('name')!r}) when called: timing must leave "
        "the model as it is. Use partition='auto' or a list of stage sizes."
    )


@contextlib.contextmanager
def _state_kept(model: keras.Model):
    """Writes back `model`'s non-trainable variables and Keras' seed state."""
    seed = global_seed_state()
    variables = model.non_trainable_variables + ([] if seed is None else [seed])
    saved = [v.numpy() for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(value)
