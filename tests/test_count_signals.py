"""The minimum-evidence rule, the dead window from a run's observables, and the count signals
beyond the report's three (analyze.evidence, analyze.signals), on constructed grids."""

from __future__ import annotations

import math

import torch

from unsuperpose.analyze.diagnostics import DEAD, LIVE, diagnose, diagnosis_record
from unsuperpose.analyze.evidence import (
    BURN_IN,
    MIN_FIRES,
    convergence_reason,
    dead_counts,
    live_masks,
    still_learning,
    window_for_rate,
    window_rule,
)
from unsuperpose.analyze.signals import (
    KNEE,
    MEASURED,
    NOVEL,
    knee_per_knob,
    live_per_knob,
    novel_counts,
    pool,
)

G = 512
SIZES = [128, 256, 512, 1024, 2048]


def stats(fires: list[int], since: list[int] | None = None) -> dict[str, torch.Tensor]:
    fires_t = torch.tensor(fires, dtype=torch.int64)
    since_t = torch.tensor(since if since is not None else [0] * len(fires), dtype=torch.int64)
    return {"heldout_fires": fires_t, "since_fired": since_t}


# -- the window rule ------------------------------------------------------------------------------


def test_the_window_is_the_batches_a_latent_at_the_rate_needs_to_fire_once_with_prob_999():
    # ln(1000) / (256 * -ln(1 - 0.01)) = 2.68 -> 3 batches
    assert window_for_rate(0.01, 256) == 3
    # ten times rarer: ten times longer (to within the ceiling)
    assert window_for_rate(0.001, 256) == math.ceil(math.log(1000) / (256 * -math.log1p(-0.001)))
    assert window_for_rate(0.001, 512) == math.ceil(window_for_rate(0.001, 256) / 2)


def test_the_rule_reads_each_knobs_largest_dictionarys_measured_latents_and_takes_the_median():
    rows = 100_000
    latents = {
        # knob 1: the larger dictionary counts, the smaller is not read at all; its 1% quantile
        # of 200 measured latents is the second smallest count
        (1.0, 100): stats([12] + [5_000] * 99),
        (1.0, 200): stats([30, 50] + [5_000] * 198),
        # knob 2: latents that fired fewer than MIN_FIRES times are not measured: they neither
        # set the rate nor stop the dictionary being read, however many there are (here half)
        (2.0, 100): stats([11] + [5_000] * 99),
        (2.0, 200): stats([0] * 60 + [MIN_FIRES - 1] * 40 + [100] + [5_000] * 99),
        # knob 3
        (3.0, 100): stats([400] + [5_000] * 99),
    }
    rule = window_rule(latents, batch_size=256, heldout_rows=rows, steps=10_000)
    assert rule.readable
    # the median of 50, 100 and 400
    assert (rule.fires, rule.cell, rule.measured) == (100, (2.0, 200), 100)
    assert rule.rate == 100 / rows
    assert rule.window == window_for_rate(100 / rows, 256)
    # a fourth knob value moves the median by one place at most
    latents[(4.0, 100)] = stats([12] + [5_000] * 99)
    assert window_rule(latents, batch_size=256, heldout_rows=rows, steps=10_000).fires == 50
    # a larger size at knob 3 replaces knob 3's entry (400 -> 1,000) only
    latents[(3.0, 400)] = stats([1_000] * 400)
    rule = window_rule(latents, batch_size=256, heldout_rows=rows, steps=10_000)
    assert (rule.fires, rule.cell) == (50, (1.0, 200))


def test_the_rate_is_never_below_what_the_heldout_rows_measure():
    # a dictionary of many barely measured latents: r is the MIN_FIRES floor, not lower
    rows = 262_144
    latents = {(1.0, 2048): stats([0] * 1000 + [MIN_FIRES] * 500 + [10_000] * 548)}
    rule = window_rule(latents, batch_size=256, heldout_rows=rows, steps=10**6)
    assert rule.rate == MIN_FIRES / rows
    assert rule.window == window_for_rate(MIN_FIRES / rows, 256)
    # four times the rows: a four times rarer latent is measured and protected
    latents = {(1.0, 2048): stats([0] * 1000 + [MIN_FIRES] * 500 + [40_000] * 548)}
    longer = window_rule(latents, batch_size=256, heldout_rows=4 * rows, steps=10**6)
    assert longer.window > 3 * rule.window


def test_each_dictionarys_rate_is_over_the_rows_it_was_evaluated_on():
    # merged sets evaluated on different held-out rows: 100 fires in 100,000 rows is a rate of
    # 1e-3, in 10,000 rows 1e-2; each cell's own rows set its rate
    latents = {(1.0, 100): stats([100] + [5_000] * 99), (2.0, 100): stats([100] + [5_000] * 99)}
    rows = {(1.0, 100): 100_000, (2.0, 100): 10_000}
    rule = window_rule(latents, batch_size=256, heldout_rows=rows, steps=10**6)
    assert (rule.rate, rule.cell, rule.heldout_rows) == (100 / 100_000, (1.0, 100), 100_000)


def test_a_grid_shorter_than_the_rule_asks_gets_no_reading_naming_steps_and_window():
    rows = 65_536
    fires = 20  # rate 3e-4 -> a window of ~90 batches of 256
    latents = {(1.0, 64): stats([fires] + [1_000] * 63)}
    window = window_for_rate(fires / rows, 256)
    short = window_rule(latents, batch_size=256, heldout_rows=rows, steps=BURN_IN * window - 1)
    assert not short.readable and short.window == window
    assert f"{BURN_IN * window - 1:,} steps" in short.reason
    assert f"train at least {BURN_IN * window:,} steps" in short.reason
    assert window_rule(latents, batch_size=256, heldout_rows=rows, steps=BURN_IN * window).readable


def test_a_rate_seen_fewer_than_min_fires_times_is_not_measured():
    latents = {(1.0, 64): stats([MIN_FIRES - 1] * 64), (1.0, 32): stats([1_000] * 32)}
    rule = window_rule(latents, batch_size=256, heldout_rows=4_096, steps=10**9)
    # only the knob value's largest dictionary is read, and none of its latents is measured
    assert not rule.readable and rule.window is None
    assert f"(at most {MIN_FIRES - 1})" in rule.reason and "more held-out rows" in rule.reason
    # one measured latent is enough
    latents = {(1.0, 200): stats([0] * 199 + [40])}
    rule = window_rule(latents, batch_size=256, heldout_rows=4_096, steps=10**9)
    assert rule.readable and (rule.fires, rule.measured) == (40, 1)


def test_a_run_without_per_latent_statistics_gets_no_reading():
    rule = window_rule({}, batch_size=256, heldout_rows=4_096, steps=250)
    assert not rule.readable and "per-latent statistics" in rule.reason


def test_dead_counts_and_live_masks_read_since_fired_at_any_window():
    latents = {(1.0, 4): stats([5, 5, 5, 5], since=[0, 9, 10, 500])}
    assert dead_counts(latents, 10) == {(1.0, 4): 2}
    assert dead_counts(latents, 501) == {(1.0, 4): 0}
    assert live_masks(latents, 10)[(1.0, 4)].tolist() == [True, True, False, False]


def test_below_the_minimum_evidence_every_signal_is_no_reading_and_there_is_no_estimate():
    latents = {(1.0, 64): stats([12] + [1_000] * 63)}  # a window of 148 batches: 296 steps
    rule = window_rule(latents, batch_size=256, heldout_rows=65_536, steps=250)
    assert rule.window == 148
    dead = {(a, n): (0 if n <= G else n - G) for a in (1.0, 2.0) for n in SIZES}
    d = diagnose({"dead": dead}, rule=rule, arch="topk")
    assert d.pointers and all(not p.reading and p.size is None for p in d.pointers)
    est = d.estimate()
    assert est["no_estimate"] and "250 steps" in est["no_estimate"][0]
    assert est["median"] is None and est["more_than"] is None
    rec = diagnosis_record(d, 64, "d")
    assert rec["estimate"]["no_estimate"] and rec["window_rule"]["readable"] is False
    assert all(p["reading"] is False and p["lower_bound"] is False for p in rec["pointers"])


# -- live latents ---------------------------------------------------------------------------------


def ideal_live(sizes=SIZES, values=(1.0, 2.0, 3.0), count=G) -> dict:
    return {(a, n): float(min(n, count)) for a in values for n in sizes}


def test_live_latents_point_where_the_live_count_stops_growing():
    per = live_per_knob(ideal_live())
    assert per == {a: (G, False) for a in (1.0, 2.0, 3.0)}
    assert pool(per)[1:] == (G, False)


def test_live_latents_follow_the_number_of_features():
    for count in (256, 1024):
        _, n, is_open = pool(live_per_knob(ideal_live(count=count)))
        assert (n, is_open) == (count, False)


def test_a_larger_size_without_new_evidence_does_not_move_the_live_pointer():
    base = pool(live_per_knob(ideal_live()))
    wider = ideal_live(SIZES + [4096])
    assert pool(live_per_knob(wider)) == base


def test_a_grid_whose_live_count_still_grows_at_the_largest_size_is_a_lower_bound():
    per = live_per_knob(ideal_live(count=10_000))
    assert per[1.0] == (1024, True)  # still growing from 1,024 to 2,048
    assert pool(per)[1:] == (1024, True)


def test_the_pool_is_the_lower_median_and_open_only_when_the_median_is_open():
    assert pool({1.0: (256, False), 2.0: (512, False), 3.0: (1024, True)}) == (2.0, 512, False)
    assert pool({1.0: (256, False), 2.0: (1024, True), 3.0: (2048, True)}) == (2.0, 1024, True)
    # ragged: knob 3 trained only to small sizes is open at 50, below the closed values: its true
    # value could be anywhere above 50, so the median (at least 100) is only a lower bound
    assert pool({1.0: (100, False), 2.0: (200, False), 3.0: (50, True)}) == (1.0, 100, True)


def test_live_latents_through_diagnose_from_the_dead_column():
    dead = {(a, n): n - min(n, G) for a in (3, 5, 8) for n in SIZES}
    d = diagnose({"dead": dead}, truth_size=G, arch="topk")
    live = next(p for p in d.pointers if p.diagnostic == LIVE)
    assert live.size == G and live.default and live.match["size_steps_off"] == 0
    assert d.estimate()["basis"] == [LIVE] and d.estimate()["median"] == G
    dead_pointer = next(p for p in d.pointers if p.diagnostic == DEAD)
    assert not dead_pointer.default


def test_measured_latents_ignore_sporadic_latents_the_training_window_keeps_alive():
    # past G, each larger dictionary keeps a third of its extra latents firing now and then
    # (alive in the training window) but under 10 times on the held-out rows: live latents
    # still grow, measured latents stop at G
    dead = {(a, n): n - min(n, G) - (n - min(n, G)) * 2 // 3 for a in (1, 2, 3) for n in SIZES}
    measured = {(a, n): float(min(n, G)) for a in (1, 2, 3) for n in SIZES}
    d = diagnose({"dead": dead, "measured": measured}, truth_size=G, arch="jumprelu")
    by = {p.diagnostic: p for p in d.pointers}
    assert by[MEASURED].size == G and by[MEASURED].match["size_steps_off"] == 0
    assert by[LIVE].lower_bound  # the sporadic latents keep the live count growing
    # a larger size whose added latents are all unmeasured does not move it
    measured.update({(a, 4096): float(G) for a in (1, 2, 3)})
    dead.update({(a, 4096): 0 for a in (1, 2, 3)})
    d = diagnose({"dead": dead, "measured": measured}, truth_size=G, arch="jumprelu")
    assert next(p for p in d.pointers if p.diagnostic == MEASURED).size == G


def test_below_the_evidence_measured_latents_are_no_reading_too():
    latents = {(1.0, 64): stats([12] + [1_000] * 63)}
    rule = window_rule(latents, batch_size=256, heldout_rows=65_536, steps=250)
    d = diagnose({"dead": {(1.0, 64): 0.0, (1.0, 128): 0.0}}, rule=rule, arch="jumprelu")
    assert not next(p for p in d.pointers if p.diagnostic == MEASURED).reading


# -- novel latents --------------------------------------------------------------------------------


def test_novel_latents_count_directions_the_smaller_dictionary_lacks():
    torch.manual_seed(0)
    truth = torch.linalg.qr(torch.randn(64, 64))[0][:48]  # 48 orthonormal directions in 64 dims
    atoms = {
        (1.0, 16): truth[:16],
        (1.0, 32): truth[:32],
        # past the 48 features: the same 48 and 16 duplicates of them (split / repeated)
        (1.0, 64): torch.cat([truth, truth[:16] * -1]),
        (1.0, 128): torch.cat([truth, truth[:16], torch.randn(64, 64)]),
    }
    live = {k: torch.ones(len(v), dtype=torch.bool) for k, v in atoms.items()}
    live[(1.0, 128)][64:] = False  # random directions that never fired: dead, not novel
    counts = novel_counts(atoms, live)
    assert counts == {(1.0, 16): 16, (1.0, 32): 16, (1.0, 64): 0}
    # 16 -> 32 adds 16 novel of 16 new latents (grows); 32 -> 64 adds 16 of 32 (not fewer than
    # half: grows); 64 -> 128 adds none: the pointer is 64
    cols = {"novel_next": {k: float(v) for k, v in counts.items()}, "dead": {}}
    cols["heldout_mse"] = {k: 1.0 for k in atoms}
    d = diagnose(cols)
    novel = next(p for p in d.pointers if p.diagnostic == NOVEL)
    assert (novel.size, novel.lower_bound) == (64, False)
    # a larger size that brings nothing new (the same 48 directions, duplicated) moves nothing
    atoms[(1.0, 256)] = torch.cat([truth] * 5 + [truth[:16]])
    live[(1.0, 256)] = torch.ones(256, dtype=torch.bool)
    wider = novel_counts(atoms, live)
    assert wider[(1.0, 128)] == 0 and {k: wider[k] for k in counts} == counts
    cols["novel_next"] = {k: float(v) for k, v in wider.items()}
    cols["heldout_mse"][(1.0, 256)] = 1.0
    again = next(p for p in diagnose(cols).pointers if p.diagnostic == NOVEL)
    assert (again.size, again.lower_bound) == (64, False)


# -- Matryoshka's prefix knee ---------------------------------------------------------------------


def test_the_prefix_knee_is_where_a_longer_prefix_stops_cutting_the_fvu():
    fvu = {128: 0.30, 256: 0.08, 512: 0.010, 1024: 0.0098, 2048: 0.0097}
    prefixes = {(5.0, 2048): fvu, (5.0, 1024): {m: v for m, v in fvu.items() if m <= 1024}}
    assert knee_per_knob(prefixes) == {5.0: (512, False)}
    still = {(5.0, 2048): {128: 0.4, 256: 0.3, 512: 0.2, 1024: 0.1, 2048: 0.05}}
    assert knee_per_knob(still) == {5.0: (1024, True)}
    # a larger dictionary whose new prefix adds nothing keeps the knee where it was
    prefixes[(5.0, 4096)] = {**fvu, 4096: 0.0097}
    assert knee_per_knob(prefixes) == {5.0: (512, False)}


def test_the_prefix_knee_through_diagnose_from_prefix_columns_scored_off_axis():
    fvu = {128: 0.30, 256: 0.08, 512: 0.010, 1024: 0.0098}
    columns = {f"heldout_fvu_m{m}": {(5.0, 2048): v} for m, v in fvu.items()}
    columns["heldout_fvu"] = {(5.0, 2048): 0.0097, (5.0, 1024): 0.0098}
    columns["heldout_mse"] = {(5.0, 2048): 1.0, (5.0, 1024): 1.0}
    d = diagnose(columns, truth_size=G, arch="matryoshka")
    knee = next(p for p in d.pointers if p.diagnostic == KNEE)
    assert knee.size == 512 and knee.match["size_steps_off"] == 0


# -- convergence ----------------------------------------------------------------------------------


def curve(steps: int, every: int, fall_last_fifth: float) -> list[tuple[int, float]]:
    """A training loss flat at 1 until 0.8 * steps, then lower by ``fall_last_fifth``."""
    return [
        (t, 1.0 if t <= 0.8 * steps else 1.0 - fall_last_fifth)
        for t in range(every, steps + 1, every)
    ]


def test_a_dictionary_whose_fvu_still_falls_by_001_over_the_last_fifth_is_learning():
    # losses in units of a variance of 2: a fall of 0.04 is 0.02 of FVU, of 0.01 is 0.005
    curves = {(1.0, 64): curve(1000, 50, 0.04), (1.0, 128): curve(1000, 50, 0.01)}
    falling, unknown = still_learning(curves, 1000, variance=2.0)
    assert [k for k, _ in falling] == [(1.0, 64)] and unknown == []
    assert abs(falling[0][1] - 0.02) < 1e-9
    reason = convergence_reason(curves, 1000, 2.0)
    assert "1 of 2 dictionaries were still learning" in reason and "size 64" in reason
    assert convergence_reason({(1.0, 128): curve(1000, 50, 0.01)}, 1000, 2.0) is None
    # the same fall read against a smaller variance is a larger share of it
    assert convergence_reason({(1.0, 128): curve(1000, 50, 0.01)}, 1000, 0.5) is not None


def test_a_log_too_coarse_to_show_convergence_is_not_read():
    # a 250-step run logged every 100 steps: points at 100 and 200 (and 250 at the end)
    curves = {(1.0, 64): [(100, 1.0), (200, 0.9)]}
    assert still_learning(curves, 250, 1.0) == ([], [(1.0, 64)])
    assert "--log-every" in convergence_reason(curves, 250, 1.0)
    assert "no training loss" in convergence_reason({}, 250, 1.0)


def test_an_unconverged_grid_gets_no_reading_even_when_long_enough_for_its_window():
    latents = {(1.0, 64): stats([1_000] * 64)}
    curves = {(1.0, 64): curve(5000, 100, 0.2)}
    kw = dict(batch_size=256, heldout_rows=65_536, steps=5000, variance=1.0)
    rule = window_rule(latents, curves=curves, **kw)
    assert rule.window is not None and not rule.readable and "still learning" in rule.reason
    assert window_rule(latents, curves={(1.0, 64): curve(5000, 100, 0.0)}, **kw).readable


def test_an_open_estimate_says_which_signal_still_grows():
    from unsuperpose.analyze.report_page import estimate_text

    est = {"more_than": 1024, "low": None, "high": None, "median": None, "sizes": []}
    live = estimate_text({**est, "basis": [LIVE]}, 64, "tiny layer 1", "k")
    assert "more than 1,024 features" in live and "live latents still grow" in live
    assert "keeps its latents" not in live
    dead = estimate_text({**est, "basis": [DEAD]}, 64, "tiny layer 1", "L1")
    assert "even the largest dictionary trained there keeps its latents" in dead
    none = estimate_text({**est, "no_estimate": ["the grid trained 250 steps"]}, 64, "x", "L1")
    assert none == "x: no estimate: the grid trained 250 steps."
