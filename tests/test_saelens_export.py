"""SAELens export of every architecture: the cfg.json fields and weights SAELens's inference SAE
of that architecture loads, and equal reconstructions under SAELens's own formulas.

SAELens is not installed in the test environment, so ``saelens_reconstruct`` below re-implements
what sae-lens 6.54.12 computes from an exported folder, following its source:
- loading (``loading/pretrained_sae_loaders.py``): ``handle_config_defaulting`` treats a config
  whose ``metadata.sae_lens_version`` is missing or < 6.0.0-rc.0 as pre-6.0 (and drops its
  metadata); ``SAE.load_from_disk`` (``saes/sae.py``) ends in ``load_state_dict(state_dict,
  assign=True)``, strict, so the weight names must be exactly the architecture's parameters;
- input (``saes/sae.py`` ``SAE.process_sae_in``): sae_in = x - b_dec * apply_b_dec_to_input,
  after ``run_time_activation_norm_fn_in`` (the identity for normalize_activations "none");
- "standard" (``saes/standard_sae.py`` ``StandardSAE.encode``/``decode``): hidden_pre =
  sae_in @ W_enc + b_enc, codes = ReLU(hidden_pre) (``SAE.get_activation_fn`` returns
  ``nn.ReLU()``), x_hat = codes @ W_dec + b_dec;
- "topk" (``saes/topk_sae.py`` ``TopKSAE.encode``, ``TopK.forward``, ``act_times_W_dec``):
  hidden_pre as above, times ||W_dec rows|| if rescale_acts_by_decoder_norm; torch.topk(hidden_pre,
  k, sorted=False), the values ReLU'd and scattered into zeros; decode divides the codes by the
  norms again when rescaling, then @ W_dec + b_dec;
- "jumprelu" (``saes/jumprelu_sae.py`` ``JumpReLUSAE.encode``/``decode``): codes =
  ReLU(hidden_pre) * (hidden_pre > threshold); x_hat = codes @ W_dec + b_dec.
``benchmarks/check_saelens_export.py`` runs the same comparison with the real package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file
from torch.testing import assert_close

from test_train_store import TOY, write_store  # a toy store, as `unsuperpose harvest` writes it
from unsuperpose.cli import main
from unsuperpose.toy import ToySource
from unsuperpose.train import SAETrainConfig, load_dictionary
from unsuperpose.train.registry import FAMILIES
from unsuperpose.train.saelens import CONFIG, WEIGHTS, export_saelens, saelens_architecture

D, N = 12, 40
VALUES = {"relu": [1e-3, 1e-2], "topk": [3, 7], "batchtopk": [3, 7], "matryoshka": [3, 7]}
VALUES["jumprelu"] = [1e-3, 1e-2]
EXPECTED = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "jumprelu": "jumprelu",
}
BASE_WEIGHTS = {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}


def saelens_reconstruct(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and reconstructions as SAELens 6.54.12 computes them from ``folder`` (see above)."""
    cfg = json.loads((folder / CONFIG).read_text())
    w = load_file(str(folder / WEIGHTS))
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    sae_in = x.float() - w["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    norms = w["W_dec"].norm(dim=-1)
    if arch == "standard":
        codes = torch.relu(hidden_pre)
    elif arch == "topk":
        if rescale:
            hidden_pre = hidden_pre * norms
        vals, idx = torch.topk(hidden_pre, k=cfg["k"], dim=-1, sorted=False)
        codes = torch.zeros_like(hidden_pre).scatter_(-1, idx, vals.relu())
    elif arch == "jumprelu":
        codes = torch.relu(hidden_pre) * (hidden_pre > w["threshold"]).to(hidden_pre.dtype)
    else:
        raise AssertionError(f"no SAELens re-implementation for {arch!r}")
    acts = codes * (1 / norms) if rescale else codes
    return codes, acts @ w["W_dec"] + w["b_dec"]


def make_dictionary(arch: str, s: int = 1, seed: int = 0):
    """Dictionary ``s`` of a fresh group of ``arch``, its weights perturbed so that every tensor
    matters (nonzero biases, encoder off the decoder's transpose)."""
    family = FAMILIES[arch]
    cfg = SAETrainConfig(arch=arch, dict_sizes=[N], sparsity=VALUES[arch])
    group = family.group(D, N, VALUES[arch], cfg, seed=seed)
    dictionary = group.dictionary(s)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        dictionary.W_enc.add_(0.2 * torch.randn(dictionary.W_enc.shape, generator=gen))
        dictionary.b_enc.add_(0.1 * torch.randn(dictionary.b_enc.shape, generator=gen))
        dictionary.W_dec.add_(0.1 * torch.randn(dictionary.W_dec.shape, generator=gen))
        if arch != "relu":  # relu has no decoder bias; the others keep unit rows from training
            dictionary.W_dec.div_(dictionary.W_dec.norm(dim=1, keepdim=True))
            dictionary.b_dec.add_(0.1 * torch.randn(D, generator=gen))
    return dictionary


def inputs(rows: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def set_thresholds(dictionary, x: torch.Tensor) -> None:
    """Thresholds that keep some positive codes and drop others."""
    pre = dictionary.pre_activations(x).detach()
    with torch.no_grad():
        if dictionary.arch == "jumprelu":  # per latent: a random quantile of its positive pre
            q = torch.rand(N, generator=torch.Generator().manual_seed(7)) * 0.6 + 0.2
            pos = torch.where(pre > 0, pre, torch.nan)
            t = torch.from_numpy(np.nanquantile(pos.numpy(), q.numpy(), axis=0).diagonal().copy())
            dictionary.threshold.copy_(torch.nan_to_num(t.float(), nan=0.5).clamp(min=1e-3))
        else:  # one shared threshold, as BatchTopK learns it
            dictionary.threshold.fill_(pre[pre > 0].median().item())


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_export_loads_as_its_saelens_architecture_with_equal_reconstructions(arch, tmp_path):
    dictionary = make_dictionary(arch)
    x = inputs()
    if hasattr(dictionary, "threshold"):
        set_thresholds(dictionary, x)
    folder = export_saelens(dictionary, tmp_path / arch, metadata={"hook_name": "blocks.1.mlp"})
    cfg = json.loads((folder / CONFIG).read_text())
    w = load_file(str(folder / WEIGHTS))

    assert cfg["architecture"] == EXPECTED[arch] == saelens_architecture(dictionary)
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, N, "float32")
    assert cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert Version(meta["sae_lens_version"]) >= Version("6.0.0")  # else SAELens drops metadata
    assert meta["hook_name"] == "blocks.1.mlp" and meta["arch"] == arch
    expected = dict(BASE_WEIGHTS, **({"threshold": (N,)} if EXPECTED[arch] == "jumprelu" else {}))
    assert {k: tuple(v.shape) for k, v in w.items()} == expected  # strict load_state_dict
    assert all(v.dtype == torch.float32 for v in w.values())
    if arch == "relu":
        assert torch.equal(w["b_dec"], torch.zeros(D))
        assert torch.equal(w["W_dec"], dictionary.dictionary().detach())
    else:
        assert torch.equal(w["b_dec"], dictionary.b_dec.detach())
    if arch == "topk":
        assert cfg["k"] == dictionary.config["k"] == VALUES[arch][1]
        assert cfg["rescale_acts_by_decoder_norm"] is False
    if arch in ("batchtopk", "matryoshka"):
        assert torch.equal(w["threshold"], dictionary.threshold.detach())
        assert len(set(w["threshold"].tolist())) == 1  # BatchTopK's one threshold, repeated
        assert meta["training_architecture_details"]["k"] == VALUES[arch][1]
    if arch == "matryoshka":
        assert meta["training_architecture"] == "matryoshka_batchtopk"
        widths = meta["training_architecture_details"]["matryoshka_widths"]
        assert widths == dictionary.config["prefix_sizes"] and widths[-1] == N

    codes, x_hat = saelens_reconstruct(folder, x)
    with torch.no_grad():
        ours_codes = dictionary.encode(x)
        ours = dictionary.decode(ours_codes)
    active = (ours_codes != 0).float().sum(-1)
    assert 0 < active.mean() < N  # the comparison sees both firing and silent latents
    assert_close(codes, ours_codes, atol=1e-6, rtol=1e-5)
    assert_close(x_hat, ours, atol=1e-6, rtol=1e-5)
    # the saved-and-loaded dictionary encodes the same (what the CLI exports from)
    if arch != "relu":
        dictionary.save(tmp_path / "ours")
        with torch.no_grad():
            assert_close(load_dictionary(tmp_path / "ours").encode(x), ours_codes)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_with_an_unestimated_threshold_exports_its_per_row_topk(arch, tmp_path):
    dictionary = make_dictionary(arch)
    assert bool((dictionary.threshold < 0).all())  # -1: never estimated (a fresh group)
    folder = export_saelens(dictionary, tmp_path / arch)
    cfg = json.loads((folder / CONFIG).read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == VALUES[arch][1]
    assert set(load_file(str(folder / WEIGHTS))) == set(BASE_WEIGHTS)
    x = inputs()
    codes, x_hat = saelens_reconstruct(folder, x)
    with torch.no_grad():
        assert_close(codes, dictionary.encode(x), atol=1e-6, rtol=1e-5)
        assert_close(x_hat, dictionary.decode(dictionary.encode(x)), atol=1e-6, rtol=1e-5)


def test_negative_jumprelu_threshold_and_unknown_architecture_are_refused(tmp_path):
    dictionary = make_dictionary("jumprelu")
    with torch.no_grad():
        dictionary.threshold[0] = -0.1
    with pytest.raises(ValueError, match="negative threshold"):
        export_saelens(dictionary, tmp_path / "neg")
    dictionary.arch = "gated"
    with pytest.raises(ValueError, match="no SAELens export for architecture 'gated'"):
        export_saelens(dictionary, tmp_path / "gated")


def test_train_cli_exports_another_architecture_with_its_knob(tmp_path):
    x = ToySource(TOY).sample(2048, seed=1)[0].numpy()
    store = write_store(tmp_path / "toy.zarr", x)
    args = ["train", "--store", str(store), "--out", str(tmp_path / "runs"), "--dict-sizes", "2x"]
    args += ["--arch", "batchtopk", "--topk", "2,4", "--steps", "30", "--batch-size", "64"]
    args += ["--splice-tokens", "0", "--wandb", "disabled", "--no-progress"]
    assert main(args) == 0
    grid = tmp_path / "runs" / "batchtopk-2x"
    folder = grid / "saelens" / "batchtopk-n32-k_4"
    cfg = json.loads((folder / CONFIG).read_text())
    assert cfg["architecture"] == "jumprelu"
    meta = cfg["metadata"]
    assert (meta["arch"], meta["sparsity_name"], meta["sparsity"], meta["k"]) == (
        "batchtopk",
        "k",
        4,
        4,
    )
    assert meta["hook_name"] == meta["hook"] == "toy" and meta["layer"] == 0
    ours = load_dictionary(grid / "saes" / "batchtopk-n32-k_4")
    assert float(ours.threshold[0]) > 0  # estimated during the run
    xs = torch.from_numpy(ToySource(TOY).sample(50, seed=5)[0].numpy())
    _, x_hat = saelens_reconstruct(folder, xs)
    with torch.no_grad():
        assert_close(x_hat, ours.decode(ours.encode(xs)), atol=1e-6, rtol=1e-5)
