"""Contiguous partition of a sequence of layers into balanced stages."""

from __future__ import annotations

from collections.abc import Sequence


def balanced_stage_sizes(costs: Sequence[float], num_stages: int) -> list[int]:
    """Splits `costs` into `num_stages` contiguous, non-empty runs so that the
    largest run's total is as small as possible.

    Dynamic programming over prefixes (the linear partition problem): O(S L^2)
    for S stages and L layers. Among splits with the same largest total, the
    one whose later stages are larger is taken, so that zero-cost layers
    (activations, pooling) stay with the weighted layer before them.

    Args:
        costs: Cost of each layer, in order (bytes of weights and slots,
            or seconds of forward and backward).
        num_stages: Number of stages, at most `len(costs)`.

    Returns:
        The number of layers of each stage, in order; sums to `len(costs)`.
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"Cannot split {n} layers into {num_stages} stages.")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: smallest largest-stage total splitting the first i layers
    # into s stages; cut[s][i]: where the last of those stages starts.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value <= best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes = []
    i = n
    for s in range(num_stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return sizes[::-1]
