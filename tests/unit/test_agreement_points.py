"""When the ranks of a process group compare what they hold: the agreement points."""

from __future__ import annotations


def test_ranks_compare_again_at_the_next_step_while_a_change_is_landing():
    """Agreement points: every `every` steps; after one where a change had reached some
    ranks only, the very next step too, a bounded number of times, then the period again."""
    from loomrun.runtime.group import FOLLOW_UPS, Points

    points = Points(8)
    assert [s for s in range(1, 9) if s in points] == [8] and points.after(1) == 8
    points.compared(8, landing=True)
    assert 9 in points and points.after(8) == 9
    points.compared(9, landing=False)  # it landed everywhere and was agreed
    assert 10 not in points and points.after(9) == 16
    step = 16
    for _ in range(FOLLOW_UPS):  # a change that never reaches one rank
        points.compared(step, landing=True)
        assert points.after(step) == step + 1
        step += 1
    points.compared(step, landing=True)
    assert points.after(step) == 32, "back to the period once the follow-ups are spent"
    points.compared(32, landing=False)
    points.compared(40, landing=True)
    assert points.after(40) == 41, "a settled point gives the follow-ups back"


def test_agreement_points_follow_the_time_the_steps_take():
    """By default the points are about AGREE_SECONDS apart in time, whatever a step
    takes; farther when the all_reduce itself would take more than BUDGET of the time."""
    from loomrun.runtime import group
    from loomrun.runtime.group import FIRST, Points, steps_apart

    assert steps_apart(0.0, 0.0) == FIRST, "nothing measured yet"
    assert steps_apart(1.5, 0.0001) == 1, "slow steps: every step"
    assert steps_apart(group.AGREE_SECONDS / 20, 0.0001) == 20
    assert steps_apart(0.001, 0.01) == round(0.01 / group.BUDGET / 0.001), "the all_reduce's share"
    assert steps_apart(0.001, 0.5) == round(group.MOST_SECONDS / 0.001), "but a change waits <= 1 s"
    points = Points(None, step=5)  # joined at step 5
    assert [s for s in range(1, 10) if s in points] == [5 + FIRST]
    points.compared(7, landing=False)  # nothing measured at the first point
    assert points.after(7) == 7 + FIRST
    points.compared(9, landing=False, pace=1.0, cost=0.0001)
    assert points.after(9) == 10
    points.compared(10, landing=True, pace=0.001, cost=0.0001)  # a change landing
    assert points.after(10) == 11 and 30 in points, "the plan holds across a follow-up"
    points.compared(11, landing=False, pace=0.001, cost=0.0001)  # a follow-up: same plan
    assert points.after(11) == 10 + steps_apart(0.001, 0.0001)
