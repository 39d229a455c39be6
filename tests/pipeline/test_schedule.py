"""PipelineParallel's schedules and recomputation: the same numbers as one
device, the order and what is held read from the traced graph, and clear
errors."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_weight_diff

import keras_parallel
from keras_parallel.graph_memory import held_bytes, traced_train_step

SETTINGS = [("gpipe", False), ("gpipe", True), ("1f1b", False), ("1f1b", True)]
RNG = np.random.default_rng(0)
X = RNG.normal(size=(67, 16))  # batches of 16, the last of 3: fewer than M
Y = RNG.normal(size=(67, 3))


def mlp(optimizer=lambda: keras.optimizers.Adam(1e-2)):
    def build():
        model = keras.Sequential(
            [keras.Input((16,))]
            + [keras.layers.Dense(32, activation="relu") for _ in range(4)]
            + [keras.layers.Dense(3)]
        )
        model.compile(optimizer=optimizer(), loss="mse", metrics=["mae"])
        return model

    return build


class BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def fit(build, strategy=None, x=X, y=Y, epochs=2):
    keras.utils.set_random_seed(0)
    with strategy.scope() if strategy else keras.utils.CustomObjectScope({}):
        model = build()
    logs = BatchLogs()
    model.fit(
        x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, callbacks=[logs]
    )
    return model, logs.logs


def max_logs_diff(a, b) -> float:
    assert [sorted(d) for d in a] == [sorted(d) for d in b]
    return max(abs(u[k] - v[k]) for u, v in zip(a, b, strict=True) for k in u)


@pytest.mark.parametrize(
    ("schedule", "recompute", "num_devices"),
    [(*setting, 2) for setting in SETTINGS] + [("1f1b", True, 4), ("gpipe", True, 4)],
)
def test_weights_and_batch_logs_equal_one_device(
    schedule, recompute, num_devices, float64
):
    reference, reference_logs = fit(mlp())
    strategy = keras_parallel.PipelineParallel(
        devices(num_devices), 4, schedule=schedule, recompute=recompute
    )
    model, logs = fit(mlp(), strategy)
    assert max_weight_diff(model, reference) <= 1e-12
    assert max_logs_diff(logs, reference_logs) <= 1e-12


class OwnStep(keras.Model):
    """A keras.io-style train_step: no `scale_loss`, its own loss in the logs."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_variables, strict=True)
        )
        return {"loss": loss}


def own_step():
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="tanh")(inputs)
    hidden = keras.layers.Dense(32, activation="tanh")(hidden)
    model = OwnStep(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def test_1f1b_weighs_a_custom_steps_gradients_and_logs(float64):
    x, y = X[:64], Y[:64]  # 16 per batch, 4 per micro-batch
    reference, reference_logs = fit(own_step, x=x, y=y)
    strategy = keras_parallel.PipelineParallel(
        devices(2), 4, schedule="1f1b", recompute=True
    )
    model, logs = fit(own_step, strategy, x=x, y=y)
    assert max_weight_diff(model, reference) <= 1e-12
    assert max_logs_diff(logs, reference_logs) <= 1e-12


def embedding_model():
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 8),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def test_1f1b_sums_sparse_gradients_as_one_device(float64):
    x = RNG.integers(0, 20, size=(64, 5)).astype("int32")
    reference, _ = fit(embedding_model, x=x, y=Y[:64])
    strategy = keras_parallel.PipelineParallel(devices(2), 4, schedule="1f1b")
    model, _ = fit(embedding_model, strategy, x=x, y=Y[:64])
    assert max_weight_diff(model, reference) <= 1e-12


def batchnorm_mlp():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def test_1f1b_normalises_each_micro_batch_as_gpipe(float64):
    """BatchNormalization sees each micro-batch under both schedules (GPipe's
    meaning), and recomputation does not update its statistics twice."""
    x, y = X[:64], Y[:64]
    gpipe, _ = fit(batchnorm_mlp, keras_parallel.PipelineParallel(devices(2), 4), x, y)
    strategy = keras_parallel.PipelineParallel(
        devices(2), 4, schedule="1f1b", recompute=True
    )
    model, _ = fit(batchnorm_mlp, strategy, x, y)
    assert max_weight_diff(model, gpipe) <= 1e-12


def deep_mlp():
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, activation="relu") for _ in range(4)]
        + [keras.layers.Dense(64)]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def held(schedule, recompute, num_microbatches=4):
    """Bytes held for the backward per (device, micro-batch), in activations
    of one micro-batch (8 samples x 64 floats)."""
    strategy = keras_parallel.PipelineParallel(
        devices(2), num_microbatches, schedule=schedule, recompute=recompute
    )
    with strategy.scope():
        model = deep_mlp()
    x = np.zeros((8 * num_microbatches, 64), "float32")
    graph = traced_train_step(model, x, x)
    unit = 8 * 64 * 4
    found = held_bytes(graph, by_microbatch=True)
    return graph, {key: size / unit for key, size in found.items()}


@pytest.mark.parametrize(("schedule", "recompute"), SETTINGS)
def test_held_activations_follow_the_formulas(schedule, recompute):
    """Stage 0 holds layers 1-3, stage 1 layers 4-5 (bytes balanced). Per
    micro-batch, without recomputation a stage holds each ReLU's output and
    its input (stage 1's copy of stage 0's output; stage 0's input is the
    data's piece, cut before any micro-batch); with recomputation only its
    input. The loss (on the first device) holds the prediction minus the
    target per micro-batch under 1F1B, the whole batch's under GPipe."""
    graph, found = held(schedule, recompute)
    relus = {"CPU:0": 3, "CPU:1": 1}
    for i in range(4):
        stage1 = found.pop(("CPU:1", i))
        assert stage1 == (1 if recompute else 1 + relus["CPU:1"])
        stage0 = found.pop(("CPU:0", i), 0)
        loss = 1 if schedule == "1f1b" else 0  # per micro-batch, on CPU:0
        # (and a few scalars of the loss: 12 bytes)
        expected = loss + (0 if recompute else relus["CPU:0"])
        assert stage0 == pytest.approx(expected, abs=0.01)
    # Outside the micro-batches: the data's 4 pieces (stage 0's inputs) and,
    # under GPipe, the joined prediction minus target (the whole batch).
    outside = found.pop(("CPU:0", None))
    assert outside == pytest.approx(4 + (4 if schedule == "gpipe" else 0), abs=0.01)
    assert not found


def test_1f1b_forward_waits_for_the_backward_p_minus_s_before():
    """Stage s of p runs micro-batch i's forward after its forward of
    micro-batch i - 1 (the layers' outputs) and its backward of micro-batch
    i - (p - s) (the gradients and their running sums): at most p - s
    micro-batches in flight."""
    graph, _ = held("1f1b", False, num_microbatches=6)
    waits = {}
    for op in graph.get_operations():
        match = re.search(r"microbatch_(\d+)/.*stage_(\d+)_waits$", op.name)
        if match is None:
            continue
        microbatch, stage = int(match.group(1)), int(match.group(2))
        assert (stage, microbatch) not in waits  # one wait per stage and piece
        of = lambda c: int(re.search(r"microbatch_(\d+)/", c.name).group(1))  # noqa: E731
        forward = {of(c) for c in op.control_inputs if c.type == "IdentityN"}
        backward = {of(c) for c in op.control_inputs if c.type != "IdentityN"}
        waits[stage, microbatch] = forward, backward
    for stage in (0, 1):
        bound = 2 - stage
        for microbatch in range(1, 6):
            forward, backward = waits[stage, microbatch]
            assert forward == {microbatch - 1}, (stage, microbatch)
            expected = {microbatch - bound} if microbatch >= bound else set()
            assert backward == expected, (stage, microbatch)


def gan_step_model():
    class TwoOptimizers(keras.Model):
        def compile(self, **kwargs):
            super().compile(**kwargs)
            self.second = keras.optimizers.SGD(0.1)

        def train_step(self, data):
            x, y = data
            for optimizer in (self.optimizer, self.second):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(self(x) - y))
                grads = tape.gradient(loss, self.trainable_variables)
                optimizer.apply_gradients(
                    zip(grads, self.trainable_variables, strict=True)
                )
            return {"loss": loss}

    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(8)(inputs)
    model = TwoOptimizers(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def test_1f1b_refuses_a_step_that_applies_twice():
    strategy = keras_parallel.PipelineParallel(devices(2), 2, schedule="1f1b")
    with pytest.raises(ValueError, match="applies gradients more than once.*gpipe"):
        fit(gan_step_model, strategy, x=X[:32], y=Y[:32], epochs=1)


def test_recompute_notes_a_stage_with_little_to_recompute():
    strategy = keras_parallel.PipelineParallel(
        devices(2), partition=[2, 1], recompute=True
    )
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(3),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match=r"stage 1 \(CPU:1\): one layer, 'dense"):
        strategy.place(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "zero-bubble"}, r"`schedule` must be one of \['1f1b', 'gpipe'\]"),
        ({"recompute": "yes"}, "`recompute` must be False, True or 'auto'"),
        ({"recompute": 1}, "`recompute` must be False, True or 'auto'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_parallel.PipelineParallel(devices(2), 2, **kwargs)


def test_recomputation_replays_each_forward_of_a_gan_step(float64):
    """A GAN's step calls the discriminator again after a backward: the
    later calls are replayed on their own, and the step trains as on one
    device."""
    from keras_patterns import PATTERNS
    from keras_patterns import fit as fit_pattern
    from keras_patterns import max_logs_diff as max_pattern_logs_diff

    build, y = PATTERNS["gan"]
    reference, reference_logs, _ = fit_pattern(build, None, 14, y=y)
    strategy = keras_parallel.PipelineParallel(devices(2), 2, recompute=True)
    model, logs, _ = fit_pattern(build, strategy, 14, y=y)
    assert max_weight_diff(model, reference) <= 1e-12
    assert max_pattern_logs_diff(logs, reference_logs) <= 1e-12
