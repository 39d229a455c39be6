"""While a step is traced, the user's objects answer to a subclass that says
what it adds (`keras_parallel/specialize.py`), and their own class is back
afterwards."""

import keras
import pytest

from keras_parallel.specialize import own_class, specialized


class Doubling:
    """A mixin like the strategies' (one method first)."""

    def call(self, inputs):
        return 2 * super().call(inputs)


def test_the_subclass_is_named_for_what_it_adds_and_then_removed():
    layer = keras.layers.Dense(2)
    with specialized([layer], Doubling):
        assert type(layer).__name__ == "Dense[Doubling]"
        assert isinstance(layer, keras.layers.Dense)
        assert own_class(layer) is keras.layers.Dense
        assert repr(layer).startswith("<Dense[Doubling] ")
    assert type(layer) is keras.layers.Dense
    assert "Doubling" not in repr(layer)


def test_the_own_class_is_back_after_an_error():
    layer = keras.layers.Dense(2)
    with pytest.raises(ZeroDivisionError), specialized([layer], Doubling):
        1 / 0  # noqa: B018
    assert type(layer) is keras.layers.Dense
    assert not any(isinstance(v, type) for v in vars(layer).values())
