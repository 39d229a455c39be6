"""ParameterServer refuses a cluster it cannot train on before it connects,
naming what it was given and what a valid cluster looks like."""

import json

import pytest
import tensorflow as tf

import keras_parallel


def _resolver(jobs: dict, task_type: str = "worker"):
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type=task_type, task_id=0
    )


@pytest.mark.parametrize(
    "jobs, task_type, expected",
    [
        ({"worker": ["127.0.0.1:2000"]}, "worker", "at least one 'ps' task"),
        ({"ps": ["127.0.0.1:2000"]}, "ps", "at least one 'worker' task"),
        (
            {
                "ps": ["127.0.0.1:2000"],
                "worker": ["127.0.0.1:2001"],
                "chief": ["127.0.0.1:2002"],
            },
            "chief",
            "task type 'chief'",
        ),
    ],
)
def test_a_cluster_without_ps_or_worker_tasks_is_refused(jobs, task_type, expected):
    with pytest.raises(ValueError, match=expected) as raised:
        keras_parallel.ParameterServer(_resolver(jobs, task_type))
    assert "TF_CONFIG" in str(raised.value) or "'ps' or a 'worker'" in str(raised.value)


def test_no_cluster_at_all_names_the_launcher(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="keras-parallel launch --ps K"):
        keras_parallel.ParameterServer()


def test_tf_config_without_ps_tasks_is_refused(monkeypatch):
    config = {
        "cluster": {"worker": ["127.0.0.1:2000"]},
        "task": {"type": "worker", "index": 0},
    }
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    with pytest.raises(ValueError, match="at least one 'ps' task"):
        keras_parallel.ParameterServer()


def test_a_resolver_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="cluster_resolver="):
        keras_parallel.ParameterServer({"ps": ["127.0.0.1:2000"]})
