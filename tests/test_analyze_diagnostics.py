"""Where the report's three diagnostics point, on grids built by hand to say where they should."""

import math

from unsuperpose.analyze.diagnostics import (dead_boundary, diagnose, diagnosis_record, largest_alive,
                                             peak, ssll_basins)

L1S = [1e-4, 3e-4, 1e-3]
SIZES = [128, 256, 512, 1024, 2048]
TRUE = (3e-4, 512)  # the planted optimum: 512 features, best at the middle L1


def grid(fn):
    return {(a, n): fn(a, n) for a in L1S for n in SIZES}


def planted():
    """A toy-like grid with the report's picture: latents die past 512 at every L1 (and at the
    highest L1 from 256 on); SSLL has a basin over L1 from 512 up (lowest at the middle L1),
    while the smaller dictionaries' SSLL only rises with L1; MMCS with larger dictionaries and
    with the ground truth peak at TRUE."""
    dead = grid(lambda a, n: 0 if n <= (512 if a < 1e-3 else 256) else n - 256)
    bump = grid(lambda a, n: -abs(math.log2(n / 512)) - abs(L1S.index(a) - 1))
    ssll = grid(lambda a, n: (abs(L1S.index(a) - 1) if n >= 512 else L1S.index(a)) - math.log2(n))
    larger = {k: 0.9 + 0.01 * v for k, v in bump.items() if k[1] < SIZES[-1]}
    truth = {k: 0.95 + 0.01 * v for k, v in bump.items()}
    return dead, ssll, larger, truth


def by_name(d):
    return {p.diagnostic.split(" ")[0]: p for p in d.pointers}


def test_largest_alive_is_the_last_size_before_latents_die():
    dead, *_ = planted()
    assert largest_alive(dead) == {1e-4: 512, 3e-4: 512, 1e-3: 256}


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
            dead[(a, n)] = 0 if boundary is not None and n <= boundary else 7
    db = dead_boundary(dead)
    assert db.per_l1 == {1: 512, 2: 1024, 3: 1024, 4: None}
    assert (db.size, db.l1, db.open) == (1024, 3, False)
    assert db.inside == [1, 2, 3] and db.none_alive == [4] and db.all_alive == []


def test_an_l1_whose_largest_dictionary_is_alive_makes_the_pointer_a_lower_bound():
    # The demo's LM: at the two lowest L1 even 8x has no dead latent; a median over the other
    # L1 values would say "64 features" and drop that evidence.
    d_sizes = [64, 128, 256, 512]
    dead = {(a, n): 0 if (a < 2e-3 or n <= 64) else 5 for a in [3e-4, 1e-3, 3e-3, 1e-2] for n in d_sizes}
    ssll = {k: 0.0 for k in dead}
    d = diagnose(dead, ssll, {})
    p = by_name(d)["dead"]
    assert p.lower_bound and p.size == 512 and "more than 512" in p.why
    est = d.estimate()
    assert est["high"] is None and est["median"] is None and est["more_than"] == 512
    rec = diagnosis_record(d, 64, "d")
    assert rec["estimate"]["high"] is None and rec["estimate"]["ratio_high"] is None
    assert rec["pointers"][0]["lower_bound"] is True


def test_ssll_basin_needs_an_interior_minimum():
    _, ssll, _, _ = planted()
    assert ssll_basins(ssll) == {128: None, 256: None, 512: 3e-4, 1024: 3e-4, 2048: 3e-4}
    flat_end = {(a, 64): v for a, v in zip(L1S, [1.0, 0.5, 0.5])}   # lowest at the edge too: no basin
    assert ssll_basins(flat_end) == {64: None}


def test_peak_ignores_nan_and_breaks_ties_towards_the_smaller_dictionary():
    assert peak({(1.0, 64): math.nan, (1.0, 128): 0.5, (2.0, 256): 0.5}) == (1.0, 128)
    assert peak({(1.0, 64): math.nan}) is None


def test_on_the_planted_grid_every_diagnostic_points_to_the_truth():
    dead, ssll, larger, truth = planted()
    d = diagnose(dead, ssll, larger, truth, truth_size=512)
    assert d.optimum == TRUE
    p = by_name(d)
    assert (p["dead"].l1, p["dead"].size) == (3e-4, 512) and not p["dead"].lower_bound
    assert (p["loss"].l1, p["loss"].size) == TRUE
    assert (p["MMCS"].l1, p["MMCS"].size) == TRUE
    assert all(q.match["size_steps_off"] == 0 and q.match["matches_optimum"] for q in d.pointers)
    assert d.estimate() == {"low": 512, "high": 512, "median": 512, "sizes": [512, 512, 512],
                            "more_than": None}
    rec = diagnosis_record(d, 512, "G")
    assert [q["size_steps_off"] for q in rec["pointers"]] == [0, 0, 0]
    assert [q["ratio"] for q in rec["pointers"]] == [1.0, 1.0, 1.0]


def test_a_diagnostic_that_misses_says_by_how_many_grid_steps():
    dead, ssll, larger, truth = planted()
    larger[(1e-3, 1024)] = 10.0   # now peaks one size larger and one L1 step higher
    d = diagnose(dead, ssll, larger, truth, truth_size=512)
    miss = by_name(d)["MMCS"]
    assert miss.match == {"size_steps_off": 1, "size_matches_truth": False, "optimum_size_steps_off": 1,
                          "optimum_l1_steps_off": 1, "matches_optimum": False}
    assert d.estimate()["sizes"] == [512, 512, 1024] and d.estimate()["median"] == 512


def test_a_lower_bound_never_counts_as_hitting_the_truth():
    dead = grid(lambda a, n: 0)
    d = diagnose(dead, {}, {}, truth_size=512)
    assert by_name(d)["dead"].lower_bound
    assert by_name(d)["dead"].match["size_steps_off"] is None


def test_without_ground_truth_there_is_no_optimum_but_an_estimate():
    dead, ssll, larger, _ = planted()
    d = diagnose(dead, ssll, larger)
    assert d.optimum is None and all(p.match == {} for p in d.pointers)
    assert d.estimate()["median"] == 512
