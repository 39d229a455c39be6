"""ParallelMultiHeadAttention against keras.layers.MultiHeadAttention."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from graph_devices import short
from transparency import devices, train

import keras_parallel
from keras_parallel.layers import ParallelMultiHeadAttention

RNG = np.random.RandomState(0)
QUERY = RNG.normal(size=(2, 5, 8)).astype("float32")
VALUE = RNG.normal(size=(2, 5, 6)).astype("float32")
MASK = RNG.rand(2, 5, 5) > 0.3


def plain_attention():
    keras.utils.set_random_seed(0)
    layer = keras.layers.MultiHeadAttention(4, 3, bias_initializer="normal")
    layer(QUERY, VALUE)
    return layer


def full_gradients(layer, grads):
    by_name = {}
    for variable, grad in zip(layer.trainable_variables, grads, strict=True):
        name = variable.path.split("/")[-1].rsplit("_", 1)[0]
        by_name.setdefault(name, []).append(np.asarray(grad))
    order = ["query_kernel", "query_bias", "key_kernel", "key_bias"]
    order += ["value_kernel", "value_bias", "output_kernel", "output"]
    axes = {"query_kernel": 1, "key_kernel": 1, "value_kernel": 1}
    return [np.concatenate(by_name[n], axis=axes.get(n, 0)) for n in order]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"attention_mask": MASK}, {"use_causal_mask": True}],
    ids=["no mask", "attention_mask", "causal"],
)
@pytest.mark.parametrize("num_devices", [2, 4])
def test_same_outputs_scores_and_gradients(num_devices, kwargs):
    plain = plain_attention()
    sharded = ParallelMultiHeadAttention.from_layer(plain, devices(num_devices))

    query, value = tf.constant(QUERY), tf.constant(VALUE)

    def run(layer):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([query, value])
            output, scores = layer(query, value, return_attention_scores=True, **kwargs)
            loss = tf.reduce_sum(tf.sin(output))
        # `value` also serves as the key: one tensor passed twice.
        inputs = tape.gradient(loss, [query, value])
        return output, scores, tape.gradient(loss, layer.trainable_variables), inputs

    output, scores, grads, inputs = run(sharded)
    output_ref, scores_ref, grads_ref, inputs_ref = run(plain)
    for got, want in zip(inputs, inputs_ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(output, output_ref, atol=1e-5)
    np.testing.assert_allclose(scores, scores_ref, atol=1e-6)
    for got, want in zip(full_gradients(sharded, grads), grads_ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    heads = {short(k.value.device): k.shape[1] for k in sharded.shards["query_kernel"]}
    assert heads == {f"CPU:{i}": 4 // num_devices for i in range(num_devices)}
    back = sharded.to_layer()
    np.testing.assert_allclose(back(QUERY, VALUE), plain(QUERY, VALUE), atol=1e-6)


def block(parallel):
    """A pre-norm transformer block with a head-sharded attention and a
    column/row-parallel feed-forward pair, or the same with plain layers."""

    def build():
        keras.utils.set_random_seed(0)
        layers = keras_parallel.layers
        tokens = keras.Input((6,), dtype="int32")
        if parallel:
            x = layers.ParallelEmbedding(32, 16)(tokens)
        else:
            x = keras.layers.Embedding(32, 16)(tokens)
        h = keras.layers.LayerNormalization()(x)
        if parallel:
            h = layers.ParallelMultiHeadAttention(4, 4)(h, h, use_causal_mask=True)
        else:
            h = keras.layers.MultiHeadAttention(4, 4)(h, h, use_causal_mask=True)
        x = keras.layers.Add()([x, h])
        h = keras.layers.LayerNormalization()(x)
        if parallel:
            h = layers.ColumnParallelDense(32, activation="relu", gather_output=False)(
                h
            )
            h = layers.RowParallelDense(16, input_is_parallel=True)(h)
        else:
            h = keras.layers.Dense(32, activation="relu")(h)
            h = keras.layers.Dense(16)(h)
        x = keras.layers.Add()([x, h])
        outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(x))
        model = keras.Model(tokens, outputs)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
        return model

    return build


DATA = dict(
    x=RNG.randint(0, 32, (64, 6)), y=RNG.rand(64, 2).astype("float32"), batch_size=16
)


def shard_lists(layer):
    """The sharded weights of a tensor-parallel layer, one list per weight."""
    if hasattr(layer, "shards"):
        return list(layer.shards.values())
    lists = [getattr(layer, name, None) for name in ("kernels", "biases", "tables")]
    return [shards for shards in lists if shards]


def test_block_under_model_parallel_holds_a_quarter_per_device_with_slots():
    strategy = keras_parallel.PipelineParallel(devices(4))
    plain = block(False)()
    with strategy.scope():
        model = block(True)()
    copy_weights(model, plain)
    fit = dict(epochs=2, shuffle=False, verbose=0, **DATA)
    losses = model.fit(**fit).history["loss"]
    np.testing.assert_allclose(losses, plain.fit(**fit).history["loss"], atol=1e-5)
    optimizer = model.optimizer
    for layer in model.layers:
        for shards in shard_lists(layer):
            assert [short(s.value.device) for s in shards] == [
                f"CPU:{i}" for i in range(4)
            ]
            assert len({tuple(s.shape) for s in shards}) == 1
            for shard in shards:
                prefix = f"{optimizer.name}/{shard.path.replace('/', '_')}_"
                slots = [v for v in optimizer.variables if v.path.startswith(prefix)]
                assert len(slots) == 1  # momentum
                assert {v.value.device for v in slots} == {shard.value.device}
    print(keras_parallel.placement_report(model))


def copy_weights(parallel, plain):
    """Gives the parallel block the plain block's weights."""
    layers = [layer for layer in parallel.layers if layer.weights]
    plain_layers = [layer for layer in plain.layers if layer.weights]
    for mine, theirs in zip(layers, plain_layers, strict=True):
        if hasattr(mine, "set_full_weights"):
            mine.set_full_weights(theirs.get_weights())
        else:
            mine.set_weights(theirs.get_weights())


def test_block_with_parallel_layers_equals_plain_block_given_the_same_weights():
    parallel, plain = block(True)(), block(False)()
    copy_weights(parallel, plain)
    x = DATA["x"][:8]
    np.testing.assert_allclose(
        parallel.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-5
    )


def test_saves_and_loads(tmp_path):
    model, _ = train(block(True), DATA)
    path = str(tmp_path / "block.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = DATA["x"][:8]
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_heads_must_split_evenly():
    with pytest.raises(ValueError, match="`num_heads`=6 does not split evenly over 4"):
        ParallelMultiHeadAttention(6, 4, devices=devices(4))
