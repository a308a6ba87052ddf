"""The calibration's rule for changing a default reading, on constructed records."""

from benchmarks.bench_calibration import decide_defaults, decision_markdown

DEAD, LIVE, MEASURED = "dead neurons", "live latents", "measured latents"


def rec(arch, **offs):
    """A record whose signals are ``offs`` (name -> steps off; None: a bound)."""
    names = {"dead": DEAD, "live": LIVE, "measured": MEASURED}
    return {
        "arch": arch,
        "pointers": {names[k]: {"steps_off": v} for k, v in offs.items()},
    }


DECLARED = {"a": LIVE, "b": LIVE, "c": LIVE, "d": DEAD}


def test_a_default_within_one_step_everywhere_is_kept_even_if_another_is_more_often_exact():
    d = decide_defaults(
        [rec("a", live=1, measured=0, dead=0), rec("a", live=1, measured=0, dead=3)], DECLARED
    )["a"]
    assert d["default"] == LIVE and d["calibrated"] and d["grids"] == 2


def test_a_failing_default_becomes_the_signal_within_one_step_most_often_at_the_truth():
    records = [
        rec("b", live=None, measured=1, dead=0),
        rec("b", live=0, measured=0, dead=1),
        rec("b", live=0, measured=0, dead=1),
    ]
    d = decide_defaults(records, DECLARED)["b"]
    assert d["default"] == MEASURED and d["calibrated"]  # 2 at the truth against dead's 1
    assert d["signals"][LIVE] == {"within_one_step": 2, "at_truth": 2}


def test_without_any_signal_within_one_step_everywhere_the_declared_default_stays_uncalibrated():
    records = [rec("c", live=0, measured=2), rec("c", live=2, measured=0)]
    d = decide_defaults(records, DECLARED)["c"]
    assert d["default"] == LIVE and not d["calibrated"]
    table = decision_markdown(decide_defaults(records, DECLARED))
    assert "| c | 2 | live latents: 1, 1 | live latents | 1, 1 | no |" in table


def test_a_signal_missing_from_a_grid_cannot_be_chosen():
    records = [rec("d", dead=2, live=0), rec("d", dead=2)]
    d = decide_defaults(records, DECLARED)["d"]
    assert LIVE not in d["signals"] and d["default"] == DEAD and not d["calibrated"]


def test_the_calibration_the_report_prints_is_the_committed_records():
    """``CALIBRATION`` (printed by the report beside every estimate) is what the bench records
    committed with the docs say of each architecture's default reading."""
    import json
    from pathlib import Path

    from benchmarks.bench_calibration import calibration_summary
    from unsuperpose.analyze.diagnostics import CALIBRATION, DEFAULT_READING, calibration_text

    data = Path(__file__).resolve().parent.parent / "docs/results/data/calibration.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    assert CALIBRATION == calibration_summary(records, DEFAULT_READING)
    assert set(CALIBRATION) == set(DEFAULT_READING)
    for arch, c in CALIBRATION.items():
        text = calibration_text(arch)
        assert f"in {c['within_one_step']} of {c['grids']} calibration grids" in text
        assert all(miss in text for miss in c["misses"])
    assert calibration_text("ica") == "ica's default reading has not been calibrated on toy data."


def test_the_rule_for_defaults_decides_nothing_but_a_calibrated_reading():
    records = [rec("a", live=3, measured=0), rec("a", live=0, measured=None)]
    d = decide_defaults(records, DECLARED)["a"]
    assert d["default"] == LIVE and not d["calibrated"]


def test_the_defaults_are_what_the_rule_decides_on_the_committed_records():
    import json
    from pathlib import Path

    from unsuperpose.analyze.diagnostics import (
        DECLARED_READING,
        DEFAULT_READING,
        estimate_signals,
    )

    data = Path(__file__).resolve().parent.parent / "docs/results/data/calibration.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    decision = decide_defaults(records, DECLARED_READING)
    assert {arch: d["default"] for arch, d in decision.items()} == DEFAULT_READING
    for arch, reading in DEFAULT_READING.items():
        assert reading in estimate_signals(arch)  # the estimate rests on the default reading
