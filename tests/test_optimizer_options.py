"""Every Keras optimizer option trains as on one device under DataParallel
(and under PipelineParallel, which must not change the arithmetic at all).

The gradients of the whole batch are reduced before the optimizer processes
them, so clipping, accumulation, moving averages and loss scaling see what
they see on one device. Tolerance: 1e-5 after 2 epochs; the float32 rounding
of summing the replicas' partial gradients in another order moves these
weights by at most ~4e-7 (see the AdamW case, the largest).
"""

import contextlib
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from transparency import devices, max_weight_diff, train

import keras_parallel

RNG = np.random.RandomState(3)
X = RNG.rand(256, 16).astype("float32")
Y = RNG.randint(0, 10, 256)
DATA = dict(x=X, y=Y, batch_size=64, epochs=2)

OPTIMIZERS = {
    "clipnorm": lambda: keras.optimizers.SGD(0.1, clipnorm=0.1),
    "clipvalue": lambda: keras.optimizers.SGD(0.1, clipvalue=0.01),
    "global_clipnorm": lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.1),
    "ema": lambda: keras.optimizers.SGD(
        0.1, momentum=0.9, use_ema=True, ema_overwrite_frequency=3
    ),
    "accumulation": lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=3),
    "weight_decay": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "sgd_weight_decay": lambda: keras.optimizers.SGD(0.1, weight_decay=0.05),
    "loss_scale": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, clipnorm=0.1)
    ),
    "schedule": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
    ),
    "by_name": lambda: "adam",
}


def mlp(optimizer):
    def build():
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    return build


def mesh_2x2():
    """Both kernels split on their output axis (biases follow), so each
    Dense joins its output slices: clipping reads whole split gradients."""
    device_mesh = keras.distribution.DeviceMesh(
        (2, 2), ("batch", "model"), [f"cpu:{i}" for i in range(4)]
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[".*dense.*/kernel"] = (None, "model")
    return keras_parallel.MeshParallel(layout_map)


STRATEGIES = {
    "MeshParallel-2x2": mesh_2x2,
    "DataParallel-2": lambda: keras_parallel.DataParallel(devices(2)),
    "DataParallel-4": lambda: keras_parallel.DataParallel(devices(4)),
    "DataParallel-2-gradients": lambda: keras_parallel.DataParallel(
        devices(2), sharding="gradients"
    ),
    "DataParallel-2-parameters": lambda: keras_parallel.DataParallel(
        devices(2), sharding="parameters"
    ),
    "DataParallel-4-gradients": lambda: keras_parallel.DataParallel(
        devices(4), sharding="gradients"
    ),
    "DataParallel-4-parameters": lambda: keras_parallel.DataParallel(
        devices(4), sharding="parameters"
    ),
    "PipelineParallel-2": lambda: keras_parallel.PipelineParallel(devices(2)),
    # The optimizer once per step, on the summed micro-batch gradients.
    "PipelineParallel-2-1f1b": lambda: keras_parallel.PipelineParallel(
        devices(2), num_microbatches=2, schedule="1f1b", recompute=True
    ),
}


@functools.cache
def one_device(option: str):
    """Single-device training with `option` (trained once per process)."""
    return train(mlp(OPTIMIZERS[option]), DATA)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("option", sorted(OPTIMIZERS))
def test_fit_equals_one_device(option, strategy):
    build = mlp(OPTIMIZERS[option])
    if option == "accumulation" and strategy.endswith("2x2"):
        with pytest.raises(ValueError, match="gradient_accumulation_steps"):
            train(build, DATA, STRATEGIES[strategy]())
        return
    reference, ref_history = one_device(option)
    model, history = train(build, DATA, STRATEGIES[strategy]())
    assert max_weight_diff(model, reference) <= 1e-5
    np.testing.assert_allclose(history["loss"], ref_history["loss"], atol=1e-5)
    # Optimizer state too: slots, moving averages, accumulators, loss scale.
    for ours, theirs in zip(
        model.optimizer.variables, reference.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


def test_unsharded_updates_equal_one_device():
    build = mlp(OPTIMIZERS["ema"])
    reference, _ = one_device("ema")
    model, _ = train(
        build, DATA, keras_parallel.DataParallel(devices(4), sharding=None)
    )
    assert max_weight_diff(model, reference) <= 1e-5


class ClippingModel(keras.Model):
    """A user's own train_step, calling `optimizer.apply` directly."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def test_custom_train_step_equals_one_device():
    def build():
        inputs = keras.Input((16,))
        hidden = keras.layers.Dense(32, activation="relu")(inputs)
        model = ClippingModel(inputs, keras.layers.Dense(10)(hidden))
        model.compile(
            optimizer=keras.optimizers.SGD(
                0.1, global_clipnorm=0.1, gradient_accumulation_steps=2
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    reference, _ = train(build, DATA)
    model, _ = train(build, DATA, keras_parallel.DataParallel(devices(2)))
    assert max_weight_diff(model, reference) <= 1e-5


def custom_loop(strategy, make_optimizer, steps=6, optimizer_in_args=False):
    """A tf.distribute custom loop: `optimizer.apply_gradients` inside
    `strategy.run`, the optimizer reached through the step function's closure
    or passed in `strategy.run`'s `args`."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = mlp(lambda: "sgd")()
        optimizer = make_optimizer()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    batch = 64
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(batch)
    distributed = strategy.experimental_distribute_dataset(dataset)

    def replica_step(x, y, apply_to=None):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / batch
        grads = tape.gradient(loss, model.trainable_variables)
        (apply_to or optimizer).apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )
        return loss

    @tf.function
    def step(x, y):
        args = (x, y, optimizer) if optimizer_in_args else (x, y)
        losses = strategy.run(replica_step, args=args)
        return strategy.reduce("SUM", losses, axis=None)

    iterator = iter(distributed)
    losses = [float(step(*next(iterator))) for _ in range(min(steps, 4))]
    return model, optimizer, losses


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, use_ema=True),
        lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=3),
        lambda: keras.optimizers.Adam(0.01, clipnorm=0.05),
    ],
    ids=["ema", "accumulation", "clipnorm"],
)
@pytest.mark.parametrize("optimizer_in_args", [False, True])
def test_custom_loop_equals_one_device(make_optimizer, optimizer_in_args):
    ref_model, ref_optimizer, ref_losses = custom_loop(
        tf.distribute.get_strategy(), make_optimizer
    )
    model, optimizer, losses = custom_loop(
        keras_parallel.DataParallel(devices(2)),
        make_optimizer,
        optimizer_in_args=optimizer_in_args,
    )
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert max_weight_diff(model, ref_model) <= 1e-5
    for ours, theirs in zip(optimizer.variables, ref_optimizer.variables, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


class Trainer:
    """Holds the optimizer as an attribute, out of the step function's reach."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def custom_loop_weights(strategy=None):
    """One step of a custom loop whose optimizer (clipnorm: it must see the
    whole batch's gradient) is another object's attribute."""
    keras.utils.set_random_seed(0)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = mlp(lambda: "sgd")()
        trainer = Trainer(keras.optimizers.SGD(0.1, clipnorm=0.1))

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, model(x), from_logits=True
                )
            )
            if strategy is not None:
                loss /= strategy.num_replicas_in_sync
        grads = tape.gradient(loss, model.trainable_variables)
        trainer.optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )

    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(64)
    if strategy is None:
        tf.function(replica_step)(*next(iter(dataset)))
    else:
        batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
        tf.function(lambda x, y: strategy.run(replica_step, args=(x, y)))(*batch)
    return model.get_weights()


def test_an_optimizer_out_of_reach_applies_once(caplog):
    reference = custom_loop_weights()
    with caplog.at_level("WARNING"):
        weights = custom_loop_weights(keras_parallel.DataParallel(devices(2)))
    assert "did not find" not in caplog.text
    diffs = [np.abs(a - b).max() for a, b in zip(weights, reference, strict=True)]
    assert max(diffs) <= 1e-6


def test_fit_reports_nothing(caplog):
    with caplog.at_level("WARNING"):
        train(
            mlp(OPTIMIZERS["clipnorm"]), DATA, keras_parallel.DataParallel(devices(2))
        )
    assert "did not find in the step function" not in caplog.text
