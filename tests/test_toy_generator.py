"""The toy data matches the report's description (and fixes the replication's quirks)."""

import math

import numpy as np
import pytest
import torch

from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.toy.sampling import feature_probabilities


def _codes(src: ToySource, n: int) -> torch.Tensor:
    return torch.cat([src.sample(10_000, seed=i)[1] for i in range(n // 10_000)])


def test_mean_active_is_k_within_2_percent():
    src = ToySource(ToyConfig(seed=1))
    codes = _codes(src, 100_000)
    assert abs((codes > 0).sum(1).float().mean().item() - 5.0) < 0.1


def test_uncorrelated_mode_is_also_rescaled_to_k():
    src = ToySource(ToyConfig(correlated=False, k=3, seed=2))
    codes = _codes(src, 50_000)
    assert abs((codes > 0).sum(1).float().mean().item() - 3.0) < 0.06


def test_feature_frequency_decays_geometrically():
    src = ToySource(ToyConfig(seed=3))
    freq = (_codes(src, 100_000) > 0).float().mean(0).numpy()
    idx = np.arange(0, 200)  # frequent enough to estimate well
    slope = np.polyfit(idx, np.log(freq[idx]), 1)[0]
    assert slope == pytest.approx(math.log(0.99), rel=0.1)
    assert freq[:50].mean() > 2 * freq[200:250].mean()


def test_probabilities_clip_at_one_and_still_sum_to_k():
    p = feature_probabilities(G=10, k=6, decay=0.5)  # the first features would exceed 1 unclipped
    assert p.max().item() == 1.0
    assert p.sum().item() == pytest.approx(6.0)
    assert torch.all(p[:-1] >= p[1:])


def test_coefficients_are_single_uniforms():
    _, codes = ToySource(ToyConfig(seed=4)).sample(20_000)
    vals = codes[codes > 0]
    # U(0,1) has mean 1/2 and variance 1/12; the product of two uniforms would have mean 1/4.
    assert vals.mean().item() == pytest.approx(0.5, abs=0.01)
    assert vals.var().item() == pytest.approx(1 / 12, abs=0.005)


def _max_indicator_corr(correlated: bool) -> float:
    src = ToySource(ToyConfig(h=16, G=8, k=2, decay=0.9, correlated=correlated, seed=5))
    act = (src.sample(50_000)[1] > 0).double().numpy()
    corr = np.corrcoef(act.T)
    return np.abs(corr[~np.eye(8, dtype=bool)]).max()


def test_correlation_present_only_when_asked():
    assert _max_indicator_corr(True) > 0.08
    assert _max_indicator_corr(False) < 0.03


def test_features_unit_norm_and_data_is_their_combination():
    src = ToySource(ToyConfig(h=32, G=64, k=3, seed=6))
    assert src.features.shape == (64, 32)
    torch.testing.assert_close(src.features.norm(dim=1), torch.ones(64))
    x, codes = src.sample(100)
    torch.testing.assert_close(x, codes @ src.features)


def test_batches_are_deterministic_and_resumable():
    src = ToySource(ToyConfig(h=16, G=32, k=2, seed=7))
    it = src.batches(64, seed=3)
    first = [next(it) for _ in range(5)]
    again = src.batches(64, seed=3)
    assert all(torch.equal(a, next(again)) for a in first)
    resumed = next(src.batches(64, seed=3, start=3))
    assert torch.equal(resumed, first[3])
    assert not torch.equal(next(src.batches(64, seed=4)), first[0])
    assert first[0].dtype == torch.float32 and first[0].shape == (64, 16)


@pytest.mark.parametrize("kwargs, word", [
    (dict(k=600), "k must be"), (dict(decay=0.0), "decay"), (dict(decay=1.5), "decay"),
    (dict(h=0), "h must be"), (dict(G=0), "G must be"), (dict(noise=-1), "noise"),
])
def test_invalid_parameters_raise_clear_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ToyConfig(**kwargs)
