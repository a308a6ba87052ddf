"""Where the report's three diagnostics point, on grids built by hand to say where they should,
and the invariances the readings promise: a wider, ragged or merged grid moves a pointer only
when its new cells carry new evidence."""

import math

import pytest

from unsuperpose.analyze.diagnostics import (
    DEAD,
    Pointer,
    dead_boundary,
    dead_sensitivity,
    diagnose,
    diagnosis_record,
    largest_alive,
    peak,
    read_record,
    ssll_basins,
)

L1S = [1e-4, 3e-4, 1e-3]
SIZES = [128, 256, 512, 1024, 2048]
TRUE = (3e-4, 512)  # the planted optimum: 512 features, best at the middle L1

# Log losses over the three L1 values. From 512 latents up the reconstruction loss is flat, then
# jumps, and the L1 loss drops into its basin: both basins meet at the middle L1. A smaller
# dictionary's reconstruction loss rises at once (all sparsity hurts it): no basin.
BASIN = ([0.0, 0.1, 2.0], [2.0, 0.0, -0.2])
NO_BASIN = ([0.0, 2.0, 3.0], [1.0, 0.0, -1.0])


def grid(fn, l1s=L1S, sizes=SIZES):
    return {(a, n): fn(a, n) for a in l1s for n in sizes}


def losses(a, n, l1s=L1S):
    logs_r, logs_l = BASIN if n >= 512 else NO_BASIN
    i = l1s.index(a)
    return math.exp(logs_r[i] - math.log2(n)), math.exp(logs_l[i])


def planted():
    """A toy-like grid with the report's picture: latents die past 512 at every L1 (and at the
    highest L1 from 256 on); a loss basin over L1 from 512 up at the middle L1; MMCS with larger
    dictionaries and with the ground truth peak at TRUE."""
    bump = grid(lambda a, n: -abs(math.log2(n / 512)) - abs(L1S.index(a) - 1))
    return {
        "dead": grid(lambda a, n: 0 if n <= (512 if a < 1e-3 else 256) else n - 256),
        "heldout_mse": grid(lambda a, n: losses(a, n)[0]),
        "heldout_l1_loss": grid(lambda a, n: losses(a, n)[1]),
        "heldout_l0": grid(lambda a, n: 5.0),
        "mmcs_larger": {k: 0.9 + 0.01 * v for k, v in bump.items() if k[1] < SIZES[-1]},
        "mmcs": {k: 0.95 + 0.01 * v for k, v in bump.items()},
    }


def by_name(d):
    return {p.diagnostic.split(" ")[0]: p for p in d.pointers}


REPORTS_THREE = ("dead neurons", "loss stickiness (SSLL)", "MMCS with larger dictionaries")


def cells(d):
    """Where the report's three point (the other signals have tests of their own)."""
    return [(p.knob, p.size, p.lower_bound) for p in d.pointers if p.diagnostic in REPORTS_THREE]


# -- dead neurons ---------------------------------------------------------------------------------


def test_largest_alive_is_the_last_size_before_latents_die():
    assert largest_alive(planted()["dead"]) == {1e-4: 512, 3e-4: 512, 1e-3: 256}


def test_a_smaller_dictionary_with_dead_latents_stops_the_search():
    dead = {(1e-3, 128): 0, (1e-3, 256): 3, (1e-3, 512): 0, (1e-3, 1024): 9}
    # 512 has none dead, but 256 already lost latents: the boundary is 128, not 512.
    assert largest_alive(dead) == {1e-3: 128}


def test_tolerance_allows_a_fraction_of_dead_latents():
    dead = {(1e-3, 128): 1, (1e-3, 256): 2, (1e-3, 512): 60}
    assert largest_alive(dead) == {1e-3: None}
    assert largest_alive(dead, tolerance=0.01) == {1e-3: 256}


def test_dead_pointer_is_the_largest_boundary_at_the_largest_l1_reaching_it():
    dead = {}
    for a, boundary in zip([1, 2, 3, 4], [512, 1024, 1024, None]):
        for n in SIZES:
            dead[(a, n)] = 0 if boundary is not None and n <= boundary else 70
    db = dead_boundary(dead)
    assert db.per_knob == {1: 512, 2: 1024, 3: 1024, 4: None}
    assert (db.size, db.knob, db.open) == (1024, 3, False)
    assert db.inside == [1, 2, 3] and db.none_alive == [4] and db.all_alive == []


def test_an_l1_whose_largest_dictionary_is_alive_makes_the_pointer_a_lower_bound():
    # The demo's LM: at the two lowest L1 even 8x has no dead latent; a median over the other
    # L1 values would say "64 features" and drop that evidence.
    d_sizes = [64, 128, 256, 512]
    dead = {
        (a, n): 0 if (a < 2e-3 or n <= 64) else 50
        for a in [3e-4, 1e-3, 3e-3, 1e-2]
        for n in d_sizes
    }
    d = diagnose({"dead": dead})
    p = by_name(d)["dead"]
    assert p.lower_bound and p.size == 512 and "more than 512" in p.why
    est = d.estimate()
    assert est == {
        "more_than": 512,
        "low": None,
        "high": None,
        "median": None,
        "sizes": [],
        "basis": list(REPORTS_THREE),
    }
    rec = diagnosis_record(d, 64, "d")
    assert rec["estimate"]["high"] is None and rec["estimate"]["ratio_more_than"] == 8
    assert rec["pointers"][0]["lower_bound"] is True


def test_a_ragged_grid_bounds_at_the_largest_size_alive_at_the_open_l1():
    # L1 a: 64..512, all alive; L1 b: 64..1024, latents die from 256 on. The evidence says "more
    # than 512" (a was never trained larger), not "more than 1,024", the largest size anywhere.
    dead = {
        **{(1e-4, n): 0 for n in (64, 128, 256, 512)},
        **{(1e-2, n): (0 if n <= 128 else n // 10) for n in (64, 128, 256, 512, 1024)},
    }
    p = by_name(diagnose({"dead": dead}))["dead"]
    assert (p.size, p.lower_bound, p.knob) == (512, True, 1e-4)
    assert "more than 512" in p.why and "1,024" not in p.why


def test_the_demo_stores_ragged_merge_prints_the_bound_its_evidence_gives():
    # Measured on the demo's store: L1 1e-5 at 1x and 2x (all alive) merged with L1 3e-2 at 1x..8x
    # (dead from 2x) printed "more than 512"; the evidence says "more than 128".
    dead = {
        (1e-5, 64): 0,
        (1e-5, 128): 0,
        **{(3e-2, n): (0 if n == 64 else 9) for n in (64, 128, 256, 512)},
    }
    d = diagnose({"dead": dead}, tolerance=0.0)
    assert (by_name(d)["dead"].size, by_name(d)["dead"].lower_bound) == (128, True)
    assert d.estimate()["more_than"] == 128


def test_an_open_l1_trained_only_below_the_pointer_does_not_make_it_a_bound():
    # A short column at a new L1 (64 and 128, alive) says "more than 128" there; the pointer,
    # 512 at the other L1, already passes that: it stays a point, and the why names the column.
    dead = planted()["dead"]
    d0 = diagnose({"dead": dead})
    wider = {**dead, (1e-5, 128): 0, (1e-5, 256): 0}
    d1 = diagnose({"dead": wider})
    assert cells(d0)[0] == cells(d1)[0] == (3e-4, 512, False)
    assert "1e-05" in by_name(d1)["dead"].why


def test_one_straggling_dead_latent_does_not_decide_the_default_reading():
    # The demo's LM stopped growing because of 1 and 3 dead latents of 1,024.
    dead = {(1e-3, n): {512: 0, 1024: 1, 2048: 300}[n] for n in (512, 1024, 2048)}
    assert dead_boundary(dead, 0.0).size == 512  # the report's literal rule
    assert dead_boundary(dead, 0.01).size == 1024  # the default reading
    d = diagnose({"dead": dead, "dead_w100": {k: v + 4 for k, v in dead.items()}}, window=1000)
    assert d.literal() == {
        "window": 1000,
        "tolerance": 0.0,
        "size": 512,
        "knob": 1e-3,
        "lower_bound": False,
    }
    table = {(r["window"], r["tolerance"]): r["size"] for r in d.sensitivity}
    assert table == {
        (1000, 0.0): 512,
        (1000, 0.005): 1024,
        (1000, 0.01): 1024,
        (100, 0.0): None,
        (100, 0.005): None,
        (100, 0.01): 1024,
    }  # 4 of 512 dead
    rec = diagnosis_record(d, 64, "d")
    assert (
        rec["dead_reading"]["literal_rule"]["size"] == 512 and rec["dead_reading"]["window"] == 1000
    )


def test_dead_sensitivity_reads_every_window_and_tolerance():
    dead = {(1e-3, 64): 0, (1e-3, 128): 1}
    rows = dead_sensitivity({10: dead, 20: {k: 0 for k in dead}}, (0.0, 0.01))
    assert [(r["window"], r["tolerance"], r["size"], r["lower_bound"]) for r in rows] == [
        (10, 0.0, 64, False),
        (10, 0.01, 128, True),
        (20, 0.0, 128, True),
        (20, 0.01, 128, True),
    ]


# -- loss stickiness ------------------------------------------------------------------------------


def test_ssll_basin_needs_an_interior_minimum():
    c = planted()
    assert ssll_basins(c["heldout_mse"], c["heldout_l1_loss"]) == {
        128: None,
        256: None,
        512: 3e-4,
        1024: 3e-4,
        2048: 3e-4,
    }
    flat_end = {(a, 64): math.exp(v) for a, v in zip(L1S, [0.0, 1.0, 2.0])}
    assert ssll_basins(flat_end, {(a, 64): 1.0 for a in L1S}) == {64: None}


def test_a_size_without_a_basin_cannot_unmake_another_sizes_basin():
    # Grid-wide z-scores let a new row change every size's weights (a constructed case:
    # adding a 256 row moved the pointer from 512 to none). Per-size profiles cannot.
    c = planted()
    only_512 = {k: {key: v for key, v in col.items() if key[1] == 512} for k, col in c.items()}
    alone = by_name(diagnose(only_512))["loss"]
    with_256 = {
        k: {key: v for key, v in col.items() if key[1] in (256, 512)} for k, col in c.items()
    }
    # a 256 row with wild losses (orders of magnitude apart)
    for a in L1S:
        with_256["heldout_mse"][(a, 256)] = 10.0 ** (6 * L1S.index(a))
        with_256["heldout_l1_loss"][(a, 256)] = 10.0 ** (-6 * L1S.index(a))
    both = by_name(diagnose(with_256))["loss"]
    assert (alone.knob, alone.size) == (both.knob, both.size) == (3e-4, 512)


@pytest.mark.parametrize("collapsed_l1_loss", [0.0, 1e-9])
def test_a_collapsed_cell_reads_the_same_whether_its_l1_loss_is_0_or_1e_9(collapsed_l1_loss):
    c = planted()
    base = cells(diagnose(c))
    for n in SIZES:  # a fourth L1 past the grid where the codes collapsed
        c["heldout_mse"][(1e-2, n)] = 50.0
        c["heldout_l1_loss"][(1e-2, n)] = collapsed_l1_loss
        c["heldout_l0"][(1e-2, n)] = 1e-5 if collapsed_l1_loss else 0.0
        c["dead"][(1e-2, n)] = n
    assert cells(diagnose(c))[1] == base[1] == (3e-4, 512, False)


# -- invariance of the whole diagnosis to a wider grid ---------------------------------------------


def test_an_l1_column_below_the_grid_leaves_the_pointers_where_the_evidence_is():
    # A regression case: at L1 1e-5 overcomplete dictionaries still shed latents (the
    # toy data at 5,000 steps), so nothing new is alive there and no pointer moves.
    c = planted()
    base = cells(diagnose(c, truth_size=512))
    for n in SIZES:
        c["dead"][(1e-5, n)] = 0 if n <= 512 else n - 200
        # lower reconstruction loss: flat for the large dictionaries, still falling for the small
        c["heldout_mse"][(1e-5, n)] = math.exp((-0.1 if n >= 512 else -2.0) - math.log2(n))
        c["heldout_l1_loss"][(1e-5, n)] = math.exp(3.0 if n >= 512 else 2.0)
        c["heldout_l0"][(1e-5, n)] = 40.0
        if n < SIZES[-1]:
            c["mmcs_larger"][(1e-5, n)] = 0.8
        c["mmcs"][(1e-5, n)] = 0.8
    d = diagnose(c, truth_size=512)
    assert cells(d) == base == [(3e-4, 512, False)] * 3
    assert all(p.match["size_steps_off"] == 0 for p in d.pointers if p.diagnostic in REPORTS_THREE)


def test_an_l1_column_above_the_grid_where_everything_collapsed_moves_nothing():
    c = planted()
    base = cells(diagnose(c, truth_size=512))
    for n in SIZES:
        c["dead"][(1e-1, n)] = n
        c["heldout_mse"][(1e-1, n)] = 50.0
        c["heldout_l1_loss"][(1e-1, n)] = 0.0
        c["heldout_l0"][(1e-1, n)] = 0.0
        if n < SIZES[-1]:
            c["mmcs_larger"][(1e-1, n)] = 0.1
    assert cells(diagnose(c, truth_size=512)) == base


# -- the estimate ---------------------------------------------------------------------------------


def test_a_closed_estimate_has_the_true_median():
    dead = {(1e-3, n): (0 if n <= 128 else 50) for n in (64, 128, 256, 512)}
    larger = {(1e-3, 64): 0.5, (1e-3, 128): 0.6, (1e-3, 256): 0.9}
    d = diagnose({"dead": dead, "mmcs_larger": larger})
    assert d.estimate() == {
        "more_than": None,
        "low": 128,
        "high": 256,
        "median": 192,
        "sizes": [128, 256],
        "basis": list(REPORTS_THREE),
    }


def test_peak_ignores_nan_and_breaks_ties_towards_the_smaller_dictionary():
    assert peak({(1.0, 64): math.nan, (1.0, 128): 0.5, (2.0, 256): 0.5}) == (1.0, 128)
    assert peak({(1.0, 64): math.nan}) is None


def test_on_the_planted_grid_every_diagnostic_points_to_the_truth():
    d = diagnose(planted(), truth_size=512)
    assert d.optimum == TRUE
    p = by_name(d)
    assert (p["dead"].knob, p["dead"].size) == (3e-4, 512) and not p["dead"].lower_bound
    assert (p["loss"].knob, p["loss"].size) == TRUE
    assert (p["MMCS"].knob, p["MMCS"].size) == TRUE
    assert all(
        q.match["size_steps_off"] == 0 and q.match["matches_optimum"]
        for q in d.pointers
        if q.diagnostic in REPORTS_THREE
    )
    assert d.estimate() == {
        "low": 512,
        "high": 512,
        "median": 512,
        "sizes": [512, 512, 512],
        "more_than": None,
        "basis": list(REPORTS_THREE),
    }
    rec = diagnosis_record(d, 512, "G")
    assert [q["size_steps_off"] for q in rec["pointers"][:3]] == [0, 0, 0]
    assert [q["ratio"] for q in rec["pointers"]] == [1.0] * 4  # the three and live latents


def test_a_diagnostic_that_misses_says_by_how_many_grid_steps():
    c = planted()
    c["mmcs_larger"][(1e-3, 1024)] = 10.0  # now peaks one size larger and one L1 step higher
    d = diagnose(c, truth_size=512)
    miss = by_name(d)["MMCS"]
    assert miss.match == {
        "size_steps_off": 1,
        "size_matches_truth": False,
        "optimum_size_steps_off": 1,
        "optimum_knob_steps_off": 1,
        "matches_optimum": False,
    }
    assert d.estimate()["sizes"] == [512, 512, 1024] and d.estimate()["median"] == 512


def test_a_lower_bound_never_counts_as_hitting_the_truth():
    d = diagnose({"dead": grid(lambda a, n: 0)}, truth_size=512)
    assert by_name(d)["dead"].lower_bound
    assert by_name(d)["dead"].match["size_steps_off"] is None


def test_without_ground_truth_there_is_no_optimum_but_an_estimate():
    c = planted()
    del c["mmcs"]
    d = diagnose(c)
    assert d.optimum is None and all(p.match == {} for p in d.pointers)
    assert d.estimate()["median"] == 512


def test_the_reports_grid_wide_ssll_is_read_beside_ours():
    c = planted()
    c["ssll"] = {
        k: (abs(L1S.index(k[0]) - 1) if k[1] >= 256 else L1S.index(k[0])) for k in c["dead"]
    }
    rec = diagnosis_record(diagnose(c), 512, "G")
    assert rec["ssll_report_weights"]["size"] == 256
    assert rec["ssll_report_weights"]["basin_per_size"]["256"] == 3e-4
    assert rec["ssll_report_weights"]["basin_per_size"]["128"] is None


def test_records_and_names_from_when_the_knob_was_always_l1_still_read():
    old = {
        "pointers": [{"diagnostic": DEAD, "l1": 3e-4, "size": 512, "optimum_l1_steps_off": 1}],
        "optimum": {"l1": 1e-3, "size": 512, "mmcs": 0.9},
        "largest_alive_per_l1": {"0.001": 512},
        "dead_sensitivity": [{"window": 100, "tolerance": 0.0, "l1": 1e-3, "size": 512}],
        "dead_reading": {"tolerance": 0.0, "literal_rule": {"l1": 1e-3, "size": 512}},
    }
    for rec in (read_record(old), read_record({"lm": old, "toy": old})["toy"]):
        p = rec["pointers"][0]
        assert (p["knob"], p["optimum_knob_steps_off"]) == (3e-4, 1) and "l1" not in p
        assert rec["optimum"]["knob"] == 1e-3 and rec["dead_sensitivity"][0]["knob"] == 1e-3
        assert rec["largest_alive_per_knob"] == {"0.001": 512}
        assert rec["dead_reading"]["literal_rule"] == {"knob": 1e-3, "size": 512}
    db = dead_boundary({(1e-3, 8): 0, (1e-3, 16): 5})
    assert (db.l1, db.per_l1) == (db.knob, db.per_knob) == (1e-3, {1e-3: 8})
    assert Pointer(DEAD, 2.0, 8, "why").l1 == 2.0
