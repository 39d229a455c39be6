"""How a worker's connection checks decide that a ps task is lost: a task
that answered once and then stops answering is lost after LOST_AFTER_SECONDS;
one that never answered yet is starting, for START_SECONDS."""

from keras_parallel.parameter_server.lost_ps import (
    LOST_AFTER_SECONDS,
    START_SECONDS,
    Verdict,
)

TASKS = [(0, "127.0.0.1:1000"), (1, "127.0.0.1:1001")]


def down(*indices):
    return [(i, TASKS[i][1], "Connection refused") for i in indices]


def test_a_ps_that_stops_answering_is_lost_after_the_grace():
    verdict = Verdict(now=0.0)
    assert verdict.observe(TASKS, down(), 1.0) is None
    assert verdict.observe(TASKS, down(1), 2.0) is None
    assert verdict.observe(TASKS, down(1), 2.0 + LOST_AFTER_SECONDS - 0.1) is None
    report = verdict.observe(TASKS, down(1), 2.0 + LOST_AFTER_SECONDS)
    assert report.startswith(
        "Parameter server ps 1 (127.0.0.1:1001: Connection refused) stopped answering."
    ), report


def test_a_ps_back_before_the_grace_is_not_lost():
    verdict = Verdict(now=0.0)
    verdict.observe(TASKS, down(), 1.0)
    verdict.observe(TASKS, down(0), 2.0)
    verdict.observe(TASKS, down(), 2.0 + LOST_AFTER_SECONDS - 0.1)
    assert verdict.observe(TASKS, down(0), 2.0 + LOST_AFTER_SECONDS) is None


def test_a_ps_not_started_yet_is_waited_for_then_named():
    # Workers often start before the ps tasks; a ps that never answered is
    # not "lost" but, after START_SECONDS, reported as never started.
    verdict = Verdict(now=0.0)
    assert verdict.observe(TASKS, down(0, 1), 10 * LOST_AFTER_SECONDS) is None
    assert verdict.observe(TASKS, down(1), START_SECONDS - 1) is None
    report = verdict.observe(TASKS, down(1), START_SECONDS)
    assert report.startswith(
        f"Parameter server ps 1 (127.0.0.1:1001: Connection refused) never "
        f"answered in {START_SECONDS:.0f} s. Start every ps task"
    ), report
    assert "keras-parallel launch --ps K" in report
