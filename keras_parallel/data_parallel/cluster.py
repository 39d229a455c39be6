"""Which cluster DataParallel runs on: `TF_CONFIG`, or a given cluster resolver.

TensorFlow reads `TF_CONFIG` lazily and reports a malformed one from deep
inside server start-up (or, for a wrong task index, by waiting for a worker
that never comes). Here it is checked up front, and every problem is named
with the value that was given.
"""

from __future__ import annotations

import json
import os
import socket

import tensorflow as tf

from keras_parallel._tf_internal import collective_server_started
from keras_parallel._validation import check_cluster_resolver

ENVIRONMENT_VARIABLE = "TF_CONFIG"
# Jobs whose tasks train under a collective strategy; a chief is a worker
# that also writes checkpoints and summaries.
TRAINING_JOBS = ("chief", "worker")
EXAMPLE = (
    '{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def resolve_cluster(
    cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None,
) -> tf.distribute.cluster_resolver.ClusterResolver | None:
    """The cluster to train on, or None to train on this machine alone.

    Args:
        cluster_resolver: A cluster resolver, or None to read `TF_CONFIG`.

    Returns:
        A resolver describing at least two training tasks, or None when
        there is no cluster (no `TF_CONFIG`) or it has a single task.

    Raises:
        ValueError: for a malformed `TF_CONFIG` or cluster.
        TypeError: when `cluster_resolver` is not a cluster resolver.
    """
    if cluster_resolver is None:
        text = os.environ.get(ENVIRONMENT_VARIABLE)
        if text is None:
            return None
        parse_tf_config(text)
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    else:
        check_cluster_resolver(cluster_resolver)
    spec = cluster_resolver.cluster_spec().as_dict()
    _check_cluster(
        spec,
        {"type": cluster_resolver.task_type, "index": cluster_resolver.task_id},
        "the cluster resolver",
    )
    if sum(len(_address_list(addresses)) for addresses in spec.values()) < 2:
        return None
    _check_own_port(cluster_resolver)
    return cluster_resolver


def _check_own_port(cluster_resolver) -> None:
    """Fails early when this task's port is taken: TensorFlow would report it
    from inside its gRPC server start-up."""
    if collective_server_started():
        return  # this process's own server holds the port already
    task_type, task_id = cluster_resolver.task_type, cluster_resolver.task_id
    address = cluster_resolver.cluster_spec().task_address(task_type, task_id)
    port = int(address.rpartition(":")[2])
    with socket.socket() as probe:
        # As a server does: a port whose last user is gone may be reused.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise ValueError(
                f"Port {port} of this task ({task_type} {task_id}, {address}) "
                f"is in use ({error.strerror}), so TensorFlow cannot start this "
                "worker's server there. Stop what holds it, or give the task "
                "another port in TF_CONFIG (`keras-parallel launch` picks free "
                "ports)."
            ) from None


def parse_tf_config(text: str) -> dict:
    """Parses and checks a `TF_CONFIG` value.

    Args:
        text: The JSON text.

    Returns:
        The parsed dict, with `cluster` and `task`.

    Raises:
        ValueError: naming what is wrong, with an example of a valid value.
    """
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        _fail(f"is not valid JSON ({error}). Received: {text!r}")
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        _fail(f"needs a 'cluster' object mapping jobs to addresses. Received: {text!r}")
    _check_cluster(config["cluster"], config.get("task"), "TF_CONFIG")
    return config


def _check_cluster(cluster: dict, task, source: str) -> None:
    if not cluster:
        _fail("names no tasks: 'cluster' is empty.", source)
    for job, addresses in cluster.items():
        if job not in TRAINING_JOBS:
            _fail(
                f"has a job {job!r}; DataParallel trains on jobs "
                f"{TRAINING_JOBS} only. Parameter servers ('ps' tasks) "
                "serve keras_parallel.ParameterServer, which trains "
                "asynchronously: use it, or launch without `--ps`.",
                source,
            )
        addresses = _address_list(addresses)
        if not isinstance(addresses, list) or not addresses:
            _fail(
                f"job {job!r} must list its tasks' addresses as "
                f"['host:port', ...]. Received: {addresses!r}",
                source,
            )
        for address in addresses:
            _check_address(job, address, source)
    everywhere = [a for addresses in cluster.values() for a in _address_list(addresses)]
    repeated = sorted({a for a in everywhere if everywhere.count(a) > 1})
    if repeated:
        _fail(f"gives the address(es) {repeated} to more than one task.", source)
    if len(cluster.get("chief", [])) > 1:
        _fail(f"has {len(cluster['chief'])} chiefs; at most one is allowed.", source)
    if not isinstance(task, dict):
        _fail(
            "needs a 'task' object saying which task this process is, e.g. "
            f"{{'type': 'worker', 'index': 0}}. Received: task={task!r}",
            source,
        )
    job, index = task.get("type"), task.get("index")
    if job not in cluster:
        _fail(
            f"has task type {job!r}, which is not a job of the cluster "
            f"({sorted(cluster)}).",
            source,
        )
    count = len(_address_list(cluster[job]))
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        _fail(
            f"has task index {index!r}; job {job!r} has {count} task(s), so "
            f"the index must be an integer from 0 to {count - 1}.",
            source,
        )


def _address_list(addresses) -> list:
    # ClusterSpec's sparse form maps task indices to addresses.
    return list(addresses.values()) if isinstance(addresses, dict) else addresses


def _check_address(job: str, address, source: str) -> None:
    host, _, port = str(address).rpartition(":")
    if not isinstance(address, str) or not host or not port.isdigit():
        _fail(f"job {job!r} has the address {address!r}, not 'host:port'.", source)
    if not 1 <= int(port) <= 65535:
        _fail(
            f"job {job!r} has the address {address!r}; a port must be from 1 to 65535.",
            source,
        )


def _fail(problem: str, source: str = ENVIRONMENT_VARIABLE):
    raise ValueError(
        f"{source} {problem} A valid TF_CONFIG looks like: {EXAMPLE} "
        "(`keras-parallel launch` sets it for workers on this machine)."
    )
