"""The toy data matches the report's description (and fixes the replication's quirks)."""

import math

import numpy as np
import pytest
import torch

from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.toy.sampling import dead_window_for, feature_probabilities, zipf_probabilities


def _codes(src: ToySource, n: int) -> torch.Tensor:
    return torch.cat([src.sample(10_000, seed=i)[1] for i in range(n // 10_000)])


@pytest.mark.slow
def test_mean_active_is_k_within_2_percent():
    src = ToySource(ToyConfig(seed=1))
    codes = _codes(src, 100_000)
    assert abs((codes > 0).sum(1).float().mean().item() - 5.0) < 0.1


def test_uncorrelated_mode_is_also_rescaled_to_k():
    src = ToySource(ToyConfig(correlation=0, k=3, seed=2))
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


def _lift(
    src: ToySource, n: int = 200_000, codes: torch.Tensor | None = None
) -> tuple[float, float]:
    """Mean P(i and j) / (P(i) P(j)) over pairs of frequent features (p > 1%), for pairs in the
    same correlated group and in different groups, on the binary activities (of ``codes`` when
    given, else of ``n`` fresh samples)."""
    act = ((_codes(src, n) if codes is None else codes) > 0).float()
    n = len(act)
    p = act.mean(0)
    lift = (act.T @ act / n) / (p[:, None] * p[None, :])
    g = src.groups
    frequent = (p > 0.01)[:, None] & (p > 0.01)[None, :] & ~torch.eye(len(p), dtype=torch.bool)
    same = g[:, None] == g[None, :]
    return lift[frequent & same].mean().item(), lift[frequent & ~same].mean().item()


def test_default_correlation_makes_coactivation_plain_at_report_size():
    # G = 512, the report's size: a normalised Wishart draw gave |rho| ~ 1/sqrt(G) there, so
    # features fired together no more often than chance. The default must change that.
    src = ToySource(ToyConfig(seed=11))
    assert src.config.G == 512 and src.config.correlation > 0
    same, other = _lift(src)
    assert same > 4.0  # partners fire together several times more often than chance
    assert abs(other - 1.0) < 0.05


def test_correlation_zero_means_independent_features():
    same, other = _lift(ToySource(ToyConfig(correlation=0, seed=11)))
    assert abs(same - 1.0) < 0.1 and abs(other - 1.0) < 0.05


def test_stronger_correlation_gives_more_coactivation_and_keeps_k():
    weak, strong = (ToySource(ToyConfig(correlation=c, seed=12)) for c in (0.2, 0.8))
    assert _lift(strong, 100_000)[0] > 2 * _lift(weak, 100_000)[0]
    assert abs((_codes(strong, 50_000) > 0).sum(1).float().mean().item() - 5.0) < 0.1


def test_heldout_stream_is_fixed_and_apart_from_training():
    src = ToySource(ToyConfig(h=16, G=32, k=2, seed=7))
    held = torch.cat(list(src.heldout_batches(100, 250)))
    assert held.shape == (250, 16)
    assert torch.equal(held, torch.cat(list(src.heldout_batches(100, 250))))
    train = torch.cat([b for b, _ in zip(src.batches(50, seed=0), range(20))])
    held = held[held.norm(dim=1) > 0]  # a sample with no active feature is 0 in any stream
    assert not (torch.cdist(held, train) < 1e-6).any()


def test_fingerprint_follows_the_data_settings():
    a, b = ToySource(ToyConfig(k=5)), ToySource(ToyConfig(k=3))
    assert a.describe()["fingerprint"] != b.describe()["fingerprint"]
    assert a.describe()["fingerprint"] == ToySource(ToyConfig(k=5)).describe()["fingerprint"]


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


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(k=600), "k must be"),
        (dict(decay=0.0), "decay"),
        (dict(decay=1.5), "decay"),
        (dict(h=0), "h must be"),
        (dict(G=0), "G must be"),
        (dict(noise=-1), "noise"),
        (dict(correlation=1.0), "correlation"),
        (dict(group_size=0), "group_size"),
    ],
)
def test_invalid_parameters_raise_clear_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ToyConfig(**kwargs)


# -- the report's correlation recipe, a mode beside ours -------------------------------------------


def test_the_reports_recipe_keeps_k_and_the_marginals_and_couples_weakly():
    # The report: Bernoulli draws with probability (decay-scaled Phi(z)) rescaled to k. Same
    # covariance as ours, far weaker coupling: ~1.1-1.2x where ours gives several times.
    report = ToySource(ToyConfig(seed=13, correlation_recipe="report"))
    codes = _codes(report, 100_000)
    assert abs((codes > 0).sum(1).float().mean().item() - 5.0) < 0.1
    freq = (codes > 0).float().mean(0)
    common = report.probs > 0.01
    assert torch.allclose(freq[common], report.probs[common].float(), rtol=0.1)
    same, other = _lift(report, codes=codes)
    assert 1.05 < same < 1.4 and abs(other - 1.0) < 0.05
    ours = _lift(ToySource(ToyConfig(seed=13)), 50_000)[0]
    assert ours > 3 * same


def test_the_recipe_is_part_of_the_datas_identity_and_the_default_keeps_old_fingerprints():
    import hashlib
    import json

    default = ToySource(ToyConfig(seed=4)).describe()
    info = {k: v for k, v in default.items() if k != "fingerprint"}
    assert "correlation_recipe" not in info  # runs made before the mode existed still resume
    assert (
        default["fingerprint"]
        == hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    )
    report = ToySource(ToyConfig(seed=4, correlation_recipe="report")).describe()
    assert (
        report["correlation_recipe"] == "report" and report["fingerprint"] != default["fingerprint"]
    )


def test_the_reports_recipe_refuses_probabilities_it_cannot_rescale():
    with pytest.raises(ValueError, match="at most 1/2.*correlation_recipe='threshold'"):
        ToySource(ToyConfig(G=16, h=8, k=4, decay=0.5, correlation_recipe="report"))
    with pytest.raises(ValueError, match="correlation_recipe"):
        ToyConfig(correlation_recipe="wishart")


def test_the_dead_window_follows_the_rarest_features_rate():
    # Default data: the rarest feature is on in 0.03% of samples; a latent firing on half of its
    # occurrences goes 183 batches of 256 without firing with probability 1e-3.
    src = ToySource(ToyConfig())
    w = src.dead_window(256)
    rate = float(src.probs.min()) * 0.5
    assert w == 183 and (1 - rate) ** (256 * w) <= 1e-3 < (1 - rate) ** (256 * (w - 1))
    assert src.dead_window(512) == math.ceil(w / 2) or src.dead_window(512) == w // 2 + 1
    assert ToySource(ToyConfig(k=10)).dead_window(256) < w  # commoner features, shorter window


def test_zipfian_frequencies_run_from_p_max_to_p_min_and_the_samples_follow_them():
    p = zipf_probabilities(512, 0.5, 0.4, 5e-4)
    assert math.isclose(float(p[0]), 0.4) and math.isclose(float(p[-1]), 5e-4)
    assert bool((p[1:] < p[:-1]).all())
    # the Zipf shape: (p_i - p_min) is affine in (i + 1)^-0.5
    ranks = torch.arange(1, 513, dtype=torch.float64) ** -0.5
    fit = np.polyfit(ranks.numpy(), p.numpy(), 1)
    assert np.abs(np.polyval(fit, ranks.numpy()) - p.numpy()).max() < 1e-12
    src = ToySource(ToyConfig(G=512, frequencies="zipf", correlation=0.0, seed=3))
    assert torch.equal(src.probs, p)
    _, codes = src.sample(200_000, seed=1)
    rates = (codes > 0).double().mean(0)
    assert abs(float(rates[0]) - 0.4) < 0.01 and abs(float(rates.sum()) - float(p.sum())) < 0.1
    # the dead window the truth derives follows the rarest feature: p_min
    assert src.dead_window(256) == dead_window_for(p, 256)


def test_zipfian_frequencies_are_part_of_the_datas_identity_and_decay_keeps_old_fingerprints():
    decay = ToySource(ToyConfig(G=64, h=16)).describe()
    assert "frequencies" not in decay and "p_min" not in decay  # old fingerprints unchanged
    zipf = ToySource(ToyConfig(G=64, h=16, frequencies="zipf")).describe()
    assert zipf["frequencies"] == "zipf" and "k" not in zipf and "decay" not in zipf
    assert zipf["fingerprint"] != decay["fingerprint"]
    other = ToySource(ToyConfig(G=64, h=16, frequencies="zipf", p_min=1e-3)).describe()
    assert other["fingerprint"] != zipf["fingerprint"]
    with pytest.raises(ValueError, match="p_min and p_max"):
        ToyConfig(frequencies="zipf", p_min=0.5, p_max=0.4)


@pytest.mark.parametrize(
    "kwargs, pins",
    [
        ({}, ("118f871c7ad04be8", "902a43f698f47324", "e02f4751e0b4891d")),
        (
            dict(correlation_recipe="report"),
            ("a98cb3c2db6dd6aa", "902a43f698f47324", "c43ebdf1be4b607b"),
        ),
        (dict(correlation=0.0), ("4bc9dfe8fbf0ce4c", "902a43f698f47324", "b8377e38479515e8")),
        (dict(frequencies="zipf"), ("60481f798efeac41", "e1b8315708d086e0", "5b7c7df48e732987")),
    ],
)
def test_every_existing_mode_draws_the_very_same_data(kwargs, pins):
    # pinned before the hierarchy and the low-rank copula were added: the codes, probabilities
    # and fingerprint of each older mode must not move (runs made with them resume and merge)
    import hashlib

    src = ToySource(ToyConfig(h=32, G=64, seed=5, **kwargs))
    _, codes = src.sample(2000, seed=1)

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]

    assert digest(src.features) == "cae2087027e7e345"
    assert (digest(codes), digest(src.probs), src.describe()["fingerprint"][:16]) == pins
