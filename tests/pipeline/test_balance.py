"""Balanced contiguous partition of layer costs."""

import itertools
import random

import pytest

from keras_parallel.pipeline.balance import balanced_stage_sizes


def brute_force_best(costs, stages):
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_largest_stage_is_as_small_as_possible(seed):
    rng = random.Random(seed)
    costs = [rng.choice([0, 1, 5, 40, 100]) for _ in range(rng.randint(4, 9))]
    stages = rng.randint(1, min(4, len(costs)))
    sizes = balanced_stage_sizes(costs, stages)
    assert len(sizes) == stages and all(s >= 1 for s in sizes)
    assert sum(sizes) == len(costs)
    starts = [0, *itertools.accumulate(sizes)]
    largest = max(sum(costs[a:b]) for a, b in itertools.pairwise(starts))
    assert largest == brute_force_best(costs, stages)


def test_equal_layers_split_evenly_and_free_layers_join_the_one_before():
    assert balanced_stage_sizes([10] * 8, 4) == [2, 2, 2, 2]
    # Dense, ReLU, Dense, ReLU, ...: each activation stays after its Dense.
    assert balanced_stage_sizes([10, 0] * 4, 4) == [2, 2, 2, 2]


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match="Cannot split 2 layers into 3 stages"):
        balanced_stage_sizes([1, 1], 3)
