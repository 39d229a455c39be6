"""The cluster a `ParameterServer` runs in: `ps` tasks that hold the
variables and `worker` tasks that each run the user's script.

Every worker is its own TensorFlow client ("between-graph" training, as
TensorFlow 1's parameter servers): it starts its own gRPC server and connects
to the ps tasks only, never to the other workers, so a worker that dies or
starts late does not hold the others up. A ps task only serves: its process
starts TensorFlow's gRPC server and waits, and the workers run their reads and
updates on its devices.
"""

from __future__ import annotations

import json
import os
import threading

import tensorflow as tf

from keras_parallel._validation import check_cluster_resolver

PS_JOB = "ps"
WORKER_JOB = "worker"
EXAMPLE = (
    '{"cluster": {"ps": ["10.0.0.1:2222"], "worker": ["10.0.0.2:2222", '
    '"10.0.0.3:2222"]}, "task": {"type": "worker", "index": 0}}'
)


def resolve_ps_cluster(
    cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None,
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster of ps and worker tasks this process belongs to.

    Args:
        cluster_resolver: A cluster resolver, or None to read `TF_CONFIG`.

    Returns:
        A resolver whose cluster has a `ps` and a `worker` job and whose task
        is one of them.

    Raises:
        ValueError: when there is no cluster, it has no ps or no worker task,
            or this task is neither.
        TypeError: when `cluster_resolver` is not a cluster resolver.
    """
    if cluster_resolver is None:
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "ParameterServer needs a cluster of 'ps' and 'worker' tasks, "
                "but TF_CONFIG is not set. Set it (e.g. TF_CONFIG='"
                f"{EXAMPLE}'), pass `cluster_resolver`, or start the script "
                "with `keras-parallel launch --ps K -n N script.py`."
            )
        json.loads(os.environ["TF_CONFIG"])  # a clear JSON error first
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    else:
        check_cluster_resolver(cluster_resolver)
    jobs = cluster_resolver.cluster_spec().as_dict()
    for job in (PS_JOB, WORKER_JOB):
        if not jobs.get(job):
            raise ValueError(
                f"ParameterServer needs at least one {job!r} task, but the "
                f"cluster has jobs {sorted(jobs)}. A valid TF_CONFIG looks "
                f"like: {EXAMPLE}"
            )
    if cluster_resolver.task_type not in (PS_JOB, WORKER_JOB):
        raise ValueError(
            "Under ParameterServer every task is a 'ps' or a 'worker'. "
            f"Received: task type {cluster_resolver.task_type!r}"
        )
    return cluster_resolver


def connect_worker(resolver) -> str:
    """Starts this worker's server and connects it to the ps tasks.

    The cluster this client sees is the ps job and itself alone (a sparse
    worker job), so connecting neither waits for nor depends on the other
    workers.

    Returns:
        This worker's device prefix, `/job:worker/replica:0/task:i`.
    """
    spec = resolver.cluster_spec()
    index = resolver.task_id
    own = tf.train.ClusterSpec(
        {
            PS_JOB: spec.job_tasks(PS_JOB),
            WORKER_JOB: {index: spec.task_address(WORKER_JOB, index)},
        }
    )
    tf.config.experimental_connect_to_cluster(
        own, job_name=WORKER_JOB, task_index=index, protocol="grpc"
    )
    return f"/job:{WORKER_JOB}/replica:0/task:{index}"


def serve(resolver) -> None:
    """Runs this ps task's server until the process is stopped.

    The server is started by connecting this process's own eager context to a
    cluster of this task alone, not by `tf.distribute.Server`: the server then
    holds that context from the start. TensorFlow's eager service (2.21)
    replaces its collective executor manager whenever a client's context
    arrives while it holds none, so two workers connecting at the same moment
    each replaced it and the first one's context kept a pointer to the freed
    one: the ps crashed (SIGSEGV) at its next new kernel. With a context always
    there, the manager made with the server is kept.
    """
    index = resolver.task_id
    own = tf.train.ClusterSpec(
        {PS_JOB: {index: resolver.cluster_spec().task_address(PS_JOB, index)}}
    )
    tf.config.experimental_connect_to_cluster(
        own, job_name=PS_JOB, task_index=index, protocol="grpc"
    )
    tf.config.list_logical_devices()  # initialises the context: starts the server
    threading.Event().wait()


def ps_devices(resolver) -> list[str]:
    """The CPU of every ps task, where variables live."""
    count = len(resolver.cluster_spec().job_tasks(PS_JOB))
    return [f"/job:{PS_JOB}/replica:0/task:{k}/device:CPU:0" for k in range(count)]
