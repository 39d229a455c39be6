"""Which cluster DataParallel runs on, and the errors for a bad one. Every
error here is raised before TensorFlow starts a server, so these run in the
test process."""

import json
import socket

import pytest
import tensorflow as tf

import keras_parallel
from keras_parallel.data_parallel.cluster import parse_tf_config, resolve_cluster
from keras_parallel.launch import free_ports


def _config(workers=("127.0.0.1:2000", "127.0.0.1:2001"), index=0, job="worker"):
    return json.dumps(
        {"cluster": {job: list(workers)}, "task": {"type": job, "index": index}}
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "needs a 'cluster' object"),
        ('{"task": {"type": "worker", "index": 0}}', "needs a 'cluster' object"),
        ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "is empty"),
        (_config(workers=["127.0.0.1"]), "not 'host:port'"),
        (_config(workers=["127.0.0.1:70000"]), "from 1 to 65535"),
        (
            '{"cluster": {"worker": "127.0.0.1:2000"}, '
            '"task": {"type": "worker", "index": 0}}',
            "must list its tasks' addresses",
        ),
        (_config(index=2), "index must be an integer from 0 to 1"),
        (_config(index="0"), "has task index '0'"),
        (_config(job="ps"), "keras_parallel.ParameterServer"),
        (_config(workers=["127.0.0.1:2000"] * 2), "more than one task"),
        (
            json.dumps({"cluster": {"worker": ["127.0.0.1:2000"]}}),
            "needs a 'task' object",
        ),
        (
            json.dumps(
                {
                    "cluster": {"worker": ["127.0.0.1:2000"]},
                    "task": {"type": "chief", "index": 0},
                }
            ),
            "not a job of the cluster",
        ),
    ],
)
def test_malformed_tf_config_is_named(monkeypatch, text, expected):
    with pytest.raises(ValueError, match="TF_CONFIG") as raised:
        parse_tf_config(text)
    assert expected in str(raised.value)
    assert "A valid TF_CONFIG looks like" in str(raised.value)
    # DataParallel() reads the environment and raises the same error.
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ValueError, match="TF_CONFIG") as raised:
        keras_parallel.DataParallel()
    assert expected in str(raised.value)


def test_no_cluster_or_one_task_trains_on_this_machine(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert resolve_cluster(None) is None
    monkeypatch.setenv("TF_CONFIG", _config(workers=["127.0.0.1:2000"]))
    assert resolve_cluster(None) is None
    strategy = keras_parallel.DataParallel()
    assert type(strategy) is keras_parallel.DataParallel
    assert (strategy.num_workers, strategy.worker_index, strategy.is_chief) == (
        1,
        0,
        True,
    )
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_cluster_resolver_must_be_a_resolver():
    with pytest.raises(TypeError, match="`cluster_resolver` must be a"):
        keras_parallel.DataParallel(cluster_resolver={"worker": ["a:1"]})


def _resolver(ports, index=0):
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": [f"127.0.0.1:{p}" for p in ports]}),
        task_type="worker",
        task_id=index,
    )


def test_options_that_do_not_apply_across_workers():
    resolver = _resolver(free_ports(2))
    with pytest.raises(ValueError, match="`devices` cannot be given"):
        keras_parallel.DataParallel(["CPU:0", "CPU:1"], cluster_resolver=resolver)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        keras_parallel.DataParallel(cluster_resolver=resolver, reduction="in_process")


def test_port_in_use_is_named():
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ValueError, match=f"Port {port} of this task") as raised:
            keras_parallel.DataParallel(cluster_resolver=_resolver([port, port + 1]))
    assert "is in use" in str(raised.value)
    assert "keras-parallel launch` picks free ports" in str(raised.value)


def test_tensorflow_started_before_a_cluster_strategy_is_named():
    """A Keras optimizer made first (say, an `outer_optimizer` instance)
    starts TensorFlow, which then cannot configure its collectives."""
    from conftest import run_python

    config = _config(workers=[f"127.0.0.1:{p}" for p in free_ports(2)])
    result = run_python(
        "import keras, keras_parallel\n"
        "outer = keras.optimizers.SGD(0.7)\n"
        "keras_parallel.DataParallel(sync_every=8, outer_optimizer=outer)\n",
        timeout=120,
        env={"TF_CONFIG": config},
    )
    assert result.returncode != 0
    assert "must be created before TensorFlow starts" in result.stderr
    assert "config dict" in result.stderr
