"""The measures on constructed cases where the right answer is known."""

import math

import pytest
import torch

from unsuperpose.analyze import mcc, mmcs, mmcs_with_larger, ssll


def _random_dict(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    return a / a.norm(dim=1, keepdim=True)


def test_permuted_copy_scores_one():
    d = _random_dict(64, 32, 0)
    perm = d[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    assert mmcs(d, perm) == pytest.approx(1.0, abs=1e-6)
    assert mcc(d, perm) == pytest.approx(1.0, abs=1e-6)


def test_scale_and_extra_atoms_do_not_matter_for_mmcs():
    d = _random_dict(16, 32, 0)
    bigger = torch.cat([3.0 * d, _random_dict(16, 32, 9)])
    assert mmcs(d, bigger) == pytest.approx(1.0, abs=1e-6)


def test_random_dictionaries_score_low():
    assert mmcs(_random_dict(64, 256, 0), _random_dict(64, 256, 1)) < 0.35
    assert mcc(_random_dict(64, 256, 0), _random_dict(64, 256, 1)) < 0.25


def test_mcc_finds_the_permutation_and_punishes_duplicates():
    truth = _random_dict(8, 64, 2)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    assert mcc(truth, truth[perm]) == pytest.approx(1.0, abs=1e-6)
    # one learned atom between truth[0] and truth[1], and a stray atom: MMCS lets both true
    # features claim the shared atom, MCC gives it to one and the stray to the other
    learned = truth.clone()
    learned[0] = (truth[0] + truth[1]) / (truth[0] + truth[1]).norm()
    learned[1] = _random_dict(1, 64, 9)[0]
    shared = float(learned[0] @ truth[0])
    assert mmcs(truth, learned) == pytest.approx((6 + 2 * shared) / 8, abs=1e-5)
    assert mcc(truth, learned) < mmcs(truth, learned) - 0.5 * shared / 8


def test_mcc_of_a_smaller_dictionary_averages_over_the_reference():
    # An 1/8x dictionary holding 64 of 512 true features exactly: 64 matched at 1, 448 at 0.
    truth = _random_dict(512, 256, 3)
    part = truth[:64]
    assert mcc(truth, part) == pytest.approx(64 / 512, abs=1e-6)
    assert mcc(truth, part) <= mmcs(truth, part) + 1e-9
    # the other way round the small one is the reference and is matched in full
    assert mcc(part, truth) == pytest.approx(1.0, abs=1e-6)


def test_mismatched_widths_raise():
    with pytest.raises(ValueError, match="widths"):
        mmcs(_random_dict(4, 8, 0), _random_dict(4, 9, 0))


def test_mmcs_with_larger_averages_over_larger_dicts_at_same_l1():
    small = _random_dict(8, 16, 0)
    big_same = torch.cat([small, _random_dict(8, 16, 1)])  # contains small: MMCS 1
    big_other = _random_dict(32, 16, 2)
    dicts = {(0.1, 8): small, (0.1, 16): big_same, (0.1, 32): big_other, (0.2, 8): big_other[:8]}
    out = mmcs_with_larger(dicts)
    assert out[(0.1, 8)] == pytest.approx((1.0 + mmcs(small, big_other)) / 2, abs=1e-6)
    assert out[(0.1, 16)] == pytest.approx(mmcs(big_same, big_other), abs=1e-6)
    assert math.isnan(out[(0.1, 32)]) and math.isnan(out[(0.2, 8)])


def test_ssll_is_sum_of_z_scored_logs_and_skips_undefined_logs():
    keys = [(0.1, 8), (0.1, 16), (0.2, 8), (0.2, 16)]
    recon = dict(zip(keys, [1.0, math.e, math.e**2, 0.0]))  # last log undefined
    l1 = dict(zip(keys, [1.0, 1.0, 1.0, 1.0]))  # constant: z = 0
    out = ssll(recon, l1)
    logs = torch.tensor([0.0, 1.0, 2.0])
    z = (logs - logs.mean()) / logs.std(unbiased=False)
    for k, v in zip(keys[:3], z):
        assert out[k] == pytest.approx(float(v), abs=1e-6)
    assert math.isnan(out[keys[3]])
