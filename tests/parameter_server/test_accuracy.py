"""ParameterServer against one device where accuracy means something: 2 ps
and 2 workers training asynchronously reach one device's held-out accuracy,
seed after seed, and both workers end with the same variables."""

import pathlib

from accuracy_task import BATCH, EPOCHS, SEEDS, TRAIN, train
from ps_cluster import launch
from transparency import max_difference

TASK = pathlib.Path(__file__).with_name("accuracy_task.py")
WORKERS = 2


def _weights(result: dict, seed: int) -> list:
    count = sum(key.startswith(f"weights_{seed}_") for key in result)
    return [result[f"weights_{seed}_{i}"] for i in range(count)]


def test_two_ps_two_workers_reach_one_device_accuracy(tmp_path):
    first, second = launch(TASK, tmp_path, WORKERS, 2)
    for seed in SEEDS:
        one_device, accuracy = train(seed)
        # Both workers read the variables once fit has ended: the same
        # model, which evaluates alike on both.
        assert max_difference(_weights(first, seed), _weights(second, seed)) == 0.0
        assert first[f"accuracy_{seed}"] == second[f"accuracy_{seed}"]
        # Asynchronous updates: not one device's weights...
        assert max_difference(_weights(first, seed), one_device.get_weights()) > 1e-3
        # ...but as accurate on samples neither trained on.
        assert abs(first[f"accuracy_{seed}"] - accuracy) <= 0.05, (seed, accuracy)
    # Each worker took one device's steps (on its half of every batch), and
    # all the updates of both reached the variables.
    steps = len(SEEDS) * EPOCHS * TRAIN // BATCH
    for result in (first, second):
        assert int(result["updates"]) == steps
        assert int(result["total_updates"]) == WORKERS * steps
