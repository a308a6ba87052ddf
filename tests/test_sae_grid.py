"""The grid trainer: exact agreement with lone SAEs, recovery, dead latents, resume, errors."""

import pytest
import torch

from sae_reference import assert_matches, train_alone
from unsuperpose.analyze import mmcs
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import SAE, NonFiniteLoss, SAETrainConfig, evaluate, new_state, train_steps
from unsuperpose.train.codes import firing_counts
from unsuperpose.train.families.relu import ReluGroup
from unsuperpose.train.families.relu_fast import ReluFastGroup
from unsuperpose.train.heldout import HeldOut, score
from unsuperpose.train.init import init_params

SMALL = ToyConfig(h=16, G=32, k=2, decay=0.95, seed=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(tied=True, l1_norm="per_latent"),
        dict(decoder_init="data", encoder_init="kaiming"),
    ],
)
def test_grid_equals_each_sae_trained_alone(options):
    src = ToySource(SMALL)
    cfg = SAETrainConfig(
        sparsity=[1e-3, 1e-2],
        dict_sizes=[16, 48],
        steps=40,
        batch_size=32,
        lr=3e-3,
        log_every=10,
        resample_every=0,
        **options,
    )
    state = train_steps(new_state(src, cfg), src, progress=False)
    for g in state.groups:
        for s, l1 in enumerate(g.l1):
            assert_matches(g.sae_params(s), train_alone(src, cfg, l1, g.n))


@pytest.mark.slow
def test_recovers_ground_truth_on_a_small_problem():
    src = ToySource(ToyConfig(h=32, G=64, k=3, decay=0.99, seed=1))
    cfg = SAETrainConfig(
        sparsity=[3e-3, 1e-2], dict_sizes=[64], steps=1500, batch_size=256, lr=3e-3, log_every=500
    )
    state = train_steps(new_state(src, cfg), src, progress=False)
    best = max(mmcs(src.features, d) for d in state.dictionaries().values())
    assert best > 0.95


@pytest.mark.slow
def test_a_planted_never_firing_latent_counts_as_dead():
    src = ToySource(SMALL)
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=30, batch_size=32, dead_window=10)
    state = new_state(src, cfg)
    g = state.groups[0]
    g.b_enc[5] = -1e4  # pre-activation always negative: gets no gradient, never fires
    train_steps(state, src, progress=False)
    assert bool(g.dead_mask(cfg.dead_window, state.step)[0, 5])
    assert evaluate(state, src)[(1e-3, 16)]["dead"] >= 1


def test_dead_latents_are_also_counted_at_the_ladders_windows():
    # The dead-neuron reading's sensitivity to the window is read from these columns afterwards.
    src = ToySource(SMALL)
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=60, batch_size=32, dead_window=10)
    state = new_state(src, cfg)
    g = state.groups[0]
    g.b_enc[5] = -1e4  # never fires
    train_steps(state, src, until=30, progress=False)
    g.b_enc[7] = -1e4  # silent for the last 30 steps only
    train_steps(state, src, progress=False)
    row = evaluate(state, src)[(1e-3, 16)]
    assert [c for c in row if c.startswith("dead_w")] == ["dead_w25", "dead_w50"]
    for w in (25, 50):
        assert row[f"dead_w{w}"] == int(g.dead_mask(w, state.step).sum())
    assert row["dead_w25"] >= 2 and row["dead_w50"] >= 1
    assert row["dead_w25"] - row["dead_w50"] >= 1  # latent 7 is dead at 25, not at 50


def test_resampling_revives_only_dead_latents():
    src = ToySource(SMALL)

    def run(resample_every):
        cfg = SAETrainConfig(
            sparsity=[1e-3, 1e-2],
            dict_sizes=[16],
            steps=20,
            batch_size=32,
            dead_window=5,
            resample_every=resample_every,
            resample_until=1.0,
        )
        state = new_state(src, cfg)
        state.groups[0].b_enc[3] = -1e4  # SAE 0, latent 3: never fires
        train_steps(state, src, until=19, progress=False)
        dead = state.groups[0].dead_mask(5, 19).clone()
        train_steps(state, src, progress=False)  # step 20: an optimizer step, then the resample
        return state.groups[0], dead

    g, dead = run(20)
    plain, _ = run(0)
    assert bool(dead[0, 3])
    assert g.b_enc[3].item() == 0.0 and int(g.since_fired[0, 3]) == 0
    assert g.W_dec[0, 3].norm().item() == pytest.approx(1.0, abs=1e-5)
    alive = ~dead
    assert torch.equal(g.W_dec[alive], plain.W_dec[alive])
    assert torch.equal(
        g.W_enc.view(SMALL.h, 2, 16).permute(1, 2, 0)[alive],
        plain.W_enc.view(SMALL.h, 2, 16).permute(1, 2, 0)[alive],
    )
    assert not torch.equal(g.W_dec[dead], plain.W_dec[dead])
    # the revived latent fires on data again
    x = next(src.batches(256, seed=99))
    assert (torch.relu(x @ g.W_enc[:, 3] + g.b_enc[3]) > 0).any()


def test_stopping_and_continuing_equals_one_run():
    src = ToySource(SMALL)
    cfg = SAETrainConfig(
        sparsity=[1e-3], dict_sizes=[16], steps=30, batch_size=32, dead_window=5, resample_every=10
    )
    one = train_steps(new_state(src, cfg), src, progress=False)
    two = new_state(src, cfg)
    train_steps(two, src, until=13, progress=False)
    train_steps(two, src, progress=False)
    for a, b in zip(one.groups[0].parameters(), two.groups[0].parameters()):
        assert torch.equal(a, b)


def test_evaluate_reports_sane_reconstruction_metrics():
    src = ToySource(SMALL)
    cfg = SAETrainConfig(sparsity=[0.0, 1.0], dict_sizes=[32], steps=200, batch_size=64)
    state = train_steps(new_state(src, cfg), src, progress=False)
    m = evaluate(state, src)
    assert m[(0.0, 32)]["heldout_fvu"] < 0.1  # no sparsity pressure: near-perfect reconstruction
    assert m[(1.0, 32)]["heldout_l0"] < m[(0.0, 32)]["heldout_l0"]
    assert m[(1.0, 32)]["heldout_fvu"] > m[(0.0, 32)]["heldout_fvu"]


class _NaNSource:
    d = 8

    def batches(self, batch_size, *, seed=0, start=0):
        while True:
            x = torch.randn(batch_size, 8)
            x[0, 0] = float("nan")
            yield x


def test_non_finite_loss_names_the_sae_and_step():
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[8], steps=20, batch_size=16, log_every=5)
    with pytest.raises(NonFiniteLoss, match=r"L1 0\.001 and 8 latents.*step 5"):
        train_steps(new_state(_NaNSource(), cfg), _NaNSource(), progress=False)


def _steps(group, src, cfg, steps):
    opt = torch.optim.Adam(group.parameters(), lr=cfg.lr, fused=True)
    it = src.batches(cfg.batch_size, seed=0)
    for step in range(1, steps + 1):
        group.finish_step(group.forward_backward(next(it)), step)
        opt.step()
        group.post_step()
    return group


@pytest.mark.parametrize(
    "options",
    [dict(), dict(tied=True, l1_norm="per_latent"), dict(sparse_below=1.0), dict(sparse_below=0)],
)
def test_the_relu_fast_path_equals_the_autograd_group(options):
    """The hand-written step (dense, and the sparse CSR path with sparse_below=1) is a fast path
    of the relu family's autograd group: same parameters, dead counters and statistics."""
    src = ToySource(SMALL)
    cfg = SAETrainConfig(sparsity=[1e-3, 3e-2], dict_sizes=[24], batch_size=32, lr=3e-3, **options)
    fast = _steps(ReluFastGroup(src.d, 24, cfg.sparsity, cfg, seed=0), src, cfg, 30)
    slow = _steps(ReluGroup(src.d, 24, cfg.sparsity, cfg, seed=0), src, cfg, 30)
    if options.get("sparse_below") == 1.0:
        assert fast.sparse_steps == 30
    for name, t in slow.named_parameters().items():
        torch.testing.assert_close(fast.named_parameters()[name], t, atol=2e-5, rtol=1e-4)
    assert torch.equal(fast.since_fired, slow.since_fired)
    torch.testing.assert_close(fast.stats, slow.stats, rtol=1e-4, atol=1e-6)


def test_group_rejects_a_checkpoint_of_other_shape():
    a = ReluFastGroup(8, 16, [1e-3], SAETrainConfig(), seed=0)
    b = ReluFastGroup(8, 32, [1e-3], SAETrainConfig(), seed=0)
    with pytest.raises(ValueError, match="shape"):
        a.load_state_dict(b.state_dict())


def test_saved_sae_round_trips(tmp_path):
    params = init_params(8, 12, seed=0)
    sae = SAE(8, 12, params=params)
    sae.save(tmp_path / "s", {"l1": 0.1})
    back = SAE.load(tmp_path / "s")
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x)[0], sae(x)[0])
    assert back.config["l1"] == 0.1
    with pytest.raises(FileNotFoundError, match="not a saved dictionary"):
        SAE.load(tmp_path / "missing")


@pytest.mark.parametrize("tied", [False, True])
def test_sparse_steps_give_the_dense_results(tied):
    src = ToySource(ToyConfig(h=32, G=64, k=2, seed=3))
    base = dict(
        sparsity=[1e-3, 3e-2],
        dict_sizes=[64, 128],
        steps=25,
        batch_size=64,
        tied=tied,
        dead_window=5,
        resample_every=10,
    )
    dense = new_state(src, SAETrainConfig(**base, sparse_below=0.0))
    sparse = new_state(src, SAETrainConfig(**base, sparse_below=1.0))  # every step sparse
    for state in (dense, sparse):
        state.groups[0].b_enc[64:].fill_(-1e3)  # the second SAE of size 64 never fires
        train_steps(state, src, progress=False)
    assert all(g.sparse_steps == 25 for g in sparse.groups)
    assert all(g.sparse_steps == 0 for g in dense.groups)
    for a, b in zip(dense.groups, sparse.groups):
        for name, t in a.named_parameters().items():
            torch.testing.assert_close(b.named_parameters()[name], t, atol=1e-5, rtol=1e-4)
        assert torch.equal(a.since_fired, b.since_fired)


def test_decoder_rows_stay_unit_norm_under_adam():
    # Without renormalising after each step the raw norms drift (max ~1.27 after 1,500 steps at
    # h 32), which scales every atom's effective learning rate by 1 / norm.
    src = ToySource(ToyConfig(h=32, G=64, k=3, seed=1))
    cfg = SAETrainConfig(sparsity=[3e-3], dict_sizes=[64], steps=300, batch_size=128, lr=3e-3)
    state = train_steps(new_state(src, cfg), src, progress=False)
    norms = state.groups[0].W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_resampling_many_dead_latents_gives_distinct_atoms():
    # 200 dead latents but batches of 32: candidates come from a pool of many batches, so the
    # new atoms do not repeat.
    src = ToySource(ToyConfig(h=16, G=64, k=3, seed=2))
    cfg = SAETrainConfig(
        sparsity=[1e-3],
        dict_sizes=[256],
        steps=10,
        batch_size=32,
        dead_window=5,
        resample_every=10,
        resample_until=1.0,
        resample_pool=16,
    )
    state = new_state(src, cfg)
    g = state.groups[0]
    g.b_enc[:200] = -1e4
    train_steps(state, src, progress=False)
    atoms = g.dictionaries()[0, :200]
    assert (g.b_enc[:200] == 0).all()
    distinct = torch.unique(atoms.round(decimals=5), dim=0)
    assert len(distinct) == 200


def test_a_fresh_sae_without_params_starts_from_the_default_init():
    sae = SAE(8, 12)  # was a KeyError ('W_enc')
    torch.testing.assert_close(sae.W_dec.detach(), init_params(8, 12, seed=0)["W_dec"])
    assert sae(torch.randn(3, 8))[0].shape == (3, 8)
    assert SAE(8, 12, tied=True).W_enc is None


def test_firing_counts_are_count_nonzero_and_held_out_scoring_counts_the_same_way():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(50, 3, 7, generator=g).clamp_(min=0)
    codes[:, 1, 4] = 0  # a latent that never fires
    codes[1, 2, 3] = -2.0  # signed codes (PCA, ICA) fire too
    with_nan = codes.clone()
    with_nan[0, 0, 0] = float("nan")
    mask = torch.empty_like(codes)
    assert torch.equal(firing_counts(with_nan, mask), torch.count_nonzero(with_nan, dim=0))
    assert torch.equal(mask, (with_nan != 0).float())  # the mask a step reuses
    many = torch.ones(601, 1, 2, dtype=torch.bfloat16)  # a bf16 sum rounds 601 to 600
    assert firing_counts(many).tolist() == [[601, 601]]

    xs = [torch.randn(25, 4, generator=g) for _ in range(2)]
    parts = iter([codes[:25], codes[25:]])
    held = HeldOut(xs, 50, 4, 1.0)
    metrics, fires = score(held, lambda x: (next(parts), torch.zeros(3, len(x), 4)), 3, 7)
    assert torch.equal(fires, torch.count_nonzero(codes, dim=0))
    for s in range(3):
        assert metrics[s]["heldout_l0"] == int(torch.count_nonzero(codes[:, s])) / 50
        assert metrics[s]["heldout_dead"] == int(
            (torch.count_nonzero(codes[:, s], dim=0) == 0).sum()
        )
    assert metrics[1]["heldout_dead"] >= 1
