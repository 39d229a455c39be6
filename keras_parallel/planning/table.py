"""A plan as a table: one row per candidate strategy."""

from __future__ import annotations

COLUMNS = (
    "strategy",
    "weights",
    "grads",
    "optimizer",
    "activations",
    "gathered",
    "total/device",
    "comm/step",
    "fits",
)


def table(plan) -> str:
    """The rows of `plan.candidates`: the bytes of the device holding the
    most, what the busiest device sends per step, and whether every device
    is within `plan.device_memory`; the best is marked `*`.

    Args:
        plan: A `Plan`.

    Returns:
        The table, with a header naming the batch and the budget.
    """
    best = plan.best if any(c.fits for c in plan.candidates) else None
    rows = [COLUMNS]
    for candidate in plan.candidates:
        held = candidate.largest
        rows.append(
            (
                ("* " if candidate is best else "  ") + candidate.name,
                *(
                    _bytes(value)
                    for value in (
                        held.weights,
                        held.gradients,
                        held.optimizer,
                        held.activations,
                        held.gathered,
                        held.total,
                        candidate.communication,
                    )
                ),
                "yes" if candidate.fits else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        f"batch_size={plan.batch_size}, {len(plan.candidates[0].devices)} devices, "
        f"device_memory={_bytes(plan.device_memory)} per device (* best: "
        "least communication, then least memory)"
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines += [f"left out: {reason}" for reason in plan.skipped]
    return "\n".join(lines)


def _bytes(value: float) -> str:
    """Bytes in B, KB, MB or GB (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"
