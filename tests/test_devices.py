"""virtual_devices and device-name validation."""

import pytest
import tensorflow as tf
from conftest import NUM_DEVICES, run_python

import keras_parallel
from keras_parallel.devices import resolve_devices


def test_same_layout_again_is_a_no_op():
    names = keras_parallel.virtual_devices(NUM_DEVICES)
    assert names == [f"/device:CPU:{i}" for i in range(NUM_DEVICES)]
    assert len(tf.config.list_logical_devices("CPU")) == NUM_DEVICES


def test_other_layout_after_initialisation_says_restart():
    with pytest.raises(RuntimeError) as error:
        keras_parallel.virtual_devices(2)
    message = str(error.value)
    assert f"already initialised with {NUM_DEVICES} logical CPU" in message
    assert "restart the kernel" in message
    assert "virtual_devices(2)" in message


def test_fresh_process_gets_the_requested_layout():
    result = run_python(
        "import keras_parallel, tensorflow as tf\n"
        "print(keras_parallel.virtual_devices(3))\n"
        "print(keras_parallel.virtual_devices(3))\n"
        "print(len(tf.config.list_logical_devices('CPU')))\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == lines[1] == str([f"/device:CPU:{i}" for i in range(3)])
    assert lines[2] == "3"


@pytest.mark.parametrize(
    "args, error, fragment",
    [
        ((0,), ValueError, "`n` must be an integer >= 1"),
        ((2.5,), ValueError, "`n` must be an integer >= 1"),
        ((2, "TPU"), ValueError, "`device_type` must be one of ('CPU', 'GPU')"),
        ((2, "GPU"), ValueError, "memory_limit_mb"),
    ],
)
def test_virtual_devices_bad_arguments(args, error, fragment):
    with pytest.raises(error) as raised:
        keras_parallel.virtual_devices(*args)
    assert fragment in str(raised.value)


def test_resolve_accepts_mirrored_strategy_forms():
    assert resolve_devices(["CPU:0", "/device:CPU:1", "/cpu:2"]) == tuple(
        f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(3)
    )
    assert resolve_devices("CPU:3") == ("/job:localhost/replica:0/task:0/device:CPU:3",)
    # No GPU here: None means every logical CPU.
    assert len(resolve_devices(None)) == NUM_DEVICES


@pytest.mark.parametrize(
    "devices, error, fragments",
    [
        (["CPU:0", "CPU:9"], ValueError, ["Unknown device 'CPU:9'", "CPU:3"]),
        (["GPU:0"], ValueError, ["Unknown device 'GPU:0'"]),
        (["banana"], ValueError, ["Unknown device 'banana'"]),
        (["CPU:0", "/device:CPU:0"], ValueError, ["more than once", "CPU:0"]),
        ([], ValueError, ["`devices` is empty"]),
        ([0, 1], TypeError, ["list of device names", "[0, 1]"]),
    ],
)
def test_bad_devices_are_named(devices, error, fragments):
    with pytest.raises(error) as raised:
        keras_parallel.DataParallel(devices)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_mixed_device_types_are_refused(monkeypatch):
    # No GPU on the test machine: pretend the process lists one.
    real = tf.config.list_logical_devices

    def with_gpu(device_type=None):
        found = real(device_type)
        if device_type in (None, "GPU"):
            found = found + [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
        return found

    monkeypatch.setattr(tf.config, "list_logical_devices", with_gpu)
    with pytest.raises(ValueError) as raised:
        resolve_devices(["CPU:0", "GPU:0"])
    assert "mixes device types ['CPU', 'GPU']" in str(raised.value)
