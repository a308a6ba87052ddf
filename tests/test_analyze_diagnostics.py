"""Where the report's three diagnostics point, on grids built by hand to say where they should."""

import math

from unsuperpose.analyze.diagnostics import dead_boundary, diagnose, largest_alive, peak

L1S = [1e-4, 3e-4, 1e-3]
SIZES = [128, 256, 512, 1024, 2048]
TRUE = (3e-4, 512)  # the planted optimum: 512 features, best at the middle L1


def grid(fn):
    return {(a, n): fn(a, n) for a in L1S for n in SIZES}


def planted():
    """A toy-like grid with the report's picture: latents die past 512 at every L1; SSLL and
    MMCS with larger dictionaries peak at TRUE; MMCS with the ground truth is best there too."""
    dead = grid(lambda a, n: 0 if n <= 512 else n - 512)
    bump = grid(lambda a, n: -abs(math.log2(n / 512)) - abs(L1S.index(a) - 1))
    ssll = {k: v + 0.1 for k, v in bump.items()}
    larger = {k: 0.9 + 0.01 * v for k, v in bump.items() if k[1] < SIZES[-1]}  # NaN-free, none for the largest
    truth = {k: 0.95 + 0.01 * v for k, v in bump.items()}
    return dead, ssll, larger, truth


def test_largest_alive_is_the_last_size_before_latents_die():
    dead, *_ = planted()
    assert largest_alive(dead) == {a: 512 for a in L1S}


def test_a_smaller_dictionary_with_dead_latents_stops_the_search():
    dead = {(1e-3, 128): 0, (1e-3, 256): 3, (1e-3, 512): 0, (1e-3, 1024): 9}
    # 512 has none dead, but 256 already lost latents: the boundary is 128, not 512.
    assert largest_alive(dead) == {1e-3: 128}


def test_tolerance_allows_a_fraction_of_dead_latents():
    dead = {(1e-3, 128): 1, (1e-3, 256): 2, (1e-3, 512): 60}
    assert largest_alive(dead) == {1e-3: None}
    assert largest_alive(dead, tolerance=0.01) == {1e-3: 256}


def test_dead_boundary_takes_the_median_inside_the_grid_and_flags_the_rest():
    dead = {}
    for a, boundary in zip([1, 2, 3, 4, 5], [256, 512, 1024, None, 2048]):
        for n in SIZES:
            alive = boundary is not None and n <= boundary
            dead[(a, n)] = 0 if alive else 7
    db = dead_boundary(dead)
    assert db.per_l1 == {1: 256, 2: 512, 3: 1024, 4: None, 5: 2048}
    assert db.inside == [1, 2, 3] and db.size == 512
    assert db.all_alive == [5] and db.none_alive == [4]


def test_peak_ignores_nan_and_breaks_ties_towards_the_smaller_dictionary():
    assert peak({(1.0, 64): math.nan, (1.0, 128): 0.5, (2.0, 256): 0.5}) == (1.0, 128)
    assert peak({(1.0, 64): math.nan}) is None


def test_on_the_planted_grid_every_diagnostic_points_to_the_optimum():
    dead, ssll, larger, truth = planted()
    d = diagnose(dead, ssll, larger, truth)
    assert d.optimum == TRUE
    by = {p.diagnostic: p for p in d.pointers}
    assert by["dead neurons"].size == 512 and by["dead neurons"].l1 is None
    assert (by["loss stickiness (SSLL)"].l1, by["loss stickiness (SSLL)"].size) == TRUE
    assert (by["MMCS with larger dictionaries"].l1, by["MMCS with larger dictionaries"].size) == TRUE
    assert all(p.match["matches"] for p in d.pointers)
    assert d.estimate() == {"low": 512, "high": 512, "median": 512, "sizes": [512, 512, 512]}


def test_a_diagnostic_that_misses_says_by_how_many_grid_steps():
    dead, ssll, larger, truth = planted()
    ssll[(1e-3, 1024)] = 10.0   # SSLL now peaks one size larger and one L1 step higher
    d = diagnose(dead, ssll, larger, truth)
    miss = next(p for p in d.pointers if p.diagnostic.startswith("loss stickiness"))
    assert miss.match == {"size_steps_off": 1, "l1_steps_off": 1, "size_matches": False, "matches": False}
    assert d.estimate()["sizes"] == [512, 512, 1024] and d.estimate()["median"] == 512


def test_without_ground_truth_there_is_no_optimum_but_an_estimate():
    dead, ssll, larger, _ = planted()
    d = diagnose(dead, ssll, larger)
    assert d.optimum is None and all(p.match == {} for p in d.pointers)
    assert d.estimate()["median"] == 512


def test_a_grid_without_dead_latents_places_no_boundary():
    _, ssll, larger, _ = planted()
    d = diagnose(grid(lambda a, n: 0), ssll, larger)
    p = d.pointers[0]
    assert p.size is None and "beyond the largest" in p.why
    assert d.dead.all_alive == L1S
