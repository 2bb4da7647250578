"""The replicas table at any width: which columns go first, and numbers that are never cut."""

from __future__ import annotations

import pytest

from loomrun import replica_table as T


def _row(i: int, **changes) -> dict:
    row = dict(
        replica=f"r{i}", host="node-17", device="NVIDIA H100 80GB HBM3", state="running",
        step=123456 + i, steps_per_sec=1534.2, metrics={"loss": 0.0012345, "acc": 0.91},
        lr=0.00025, last_change=None, gpu_util=87.0, gpu_mem_used=30 * 2**30,
        gpu_mem_total=80 * 2**30, restarts=0, age=0.4,
    )  # fmt: skip
    row.update(changes)
    return row


@pytest.mark.parametrize(
    "value, shown",
    [(0.0, "0.0"), (12.34, "12.3"), (999.94, "999.9"), (1534.2, "1.53k"), (45_600, "45.6k"),
     (1.234e6, "1.23M")],
)  # fmt: skip
def test_rates_fit_in_six_characters(value, shown):
    assert T.rate(value) == shown


def test_metrics_to_three_significant_digits_lr_to_four():
    assert T.number(0.0012345) == "0.00123" and T.number(123456.0) == "1.23e+05"
    assert T.number(0.00012345, 4) == "0.0001234" and T.number(None) == "-"
    assert T.number(3) == "3" and T.number(True) == "true"


def test_at_80_columns_the_columns_that_say_nothing_go_first():
    rows = [_row(0, device="CPU", gpu_util=None), _row(1, device="CPU", gpu_util=None)]
    rows[1]["last_change"] = "lr 0.0003 -> 0.00025 at step 120000"
    fitted = T.fit(rows, ["loss", "acc"], 80)
    assert fitted.headers == [
        "replica", "state", "step", "steps/s", "loss", "acc", "lr", "last change"
    ]  # fmt: skip
    assert fitted.rows[1][-1] == "lr 0.0003 -> 0.00025…", "then last change shortens"
    assert all(len(line) <= 80 for line in fitted.lines())


def test_narrow_screens_keep_replica_state_step_loss_and_lr_whole():
    rows = [_row(0, state="failed: SIGKILL", restarts=2), _row(1, last_change="x" * 60)]
    for width, dropped in [
        (200, set()),
        (120, {"host", "age", "acc"}),
        (80, {"host", "age", "acc", "last change", "device", "restarts"}),
        (50, {"host", "age", "acc", "last change", "device", "restarts", "gpu", "steps/s"}),
    ]:
        fitted = T.fit(rows, ["loss", "acc"], width)
        assert set(T.headers(["loss", "acc"])) - set(fitted.headers) == dropped, width
        if width > 50:
            assert all(len(line) <= width for line in fitted.lines()), width
        r0 = dict(zip(fitted.headers, fitted.rows[0], strict=True))
        assert r0["state"] == "failed: SIGKILL" and r0["step"] == "123456"
        assert r0["loss"] == "0.00123" and r0["lr"] == "0.00025"


def test_last_change_shortens_before_it_goes():
    change = "lr 0.0003 -> 0.00025 at step 120000"
    rows = [_row(0, last_change=change), _row(1, host="node-18", restarts=1)]
    full = T.fit(rows, ["loss"], None)
    width = len(full.lines()[1]) - len("  0.4s") - 10  # without age, still 10 too wide
    fitted = T.fit(rows, ["loss"], width)
    change = dict(zip(fitted.headers, fitted.rows[0], strict=True))["last change"]
    assert change.endswith("…") and len(change) >= T.LAST_CHANGE_MIN
    assert all(len(line) <= width for line in fitted.lines())


def test_a_metric_named_like_a_column_is_that_column():
    rows = [_row(0, lr=None, metrics={"loss": 1.0, "lr": 0.5})]
    fitted = T.fit(rows, ["loss", "lr"], None)
    assert fitted.headers.count("lr") == 1
    assert dict(zip(fitted.headers, fitted.rows[0], strict=True))["lr"] == "0.5"


def test_what_the_broker_says_is_made_safe_for_a_terminal():
    fitted = T.fit([_row(0, host="evil\x1b[2J")], ["loss"], None)
    assert "\x1b" not in "\n".join(fitted.lines())
