"""Check our SAELens exports with the real SAELens: every architecture loads as its SAELens
architecture and reconstructs what ours does.

Two steps, two environments (SAELens is never installed in the project's venv):

    .venv/bin/python benchmarks/check_saelens_export.py --make DIR
    /tmp/saelens/bin/python benchmarks/check_saelens_export.py DIR

``--make`` (our venv) trains one small grid per architecture on toy data (h 32, G 64, 64
latents, 600 steps of 256; jumprelu with `toy`'s bandwidth and initial threshold), exports one
dictionary of each with ``export_saelens`` to DIR/<name>/, plus a BatchTopK dictionary whose
threshold was never estimated (``batchtopk-unset``, exported as "topk"), and writes
DIR/x.safetensors (held-out toy rows) and, beside each export, ours.safetensors: our codes
``encode(x)`` and reconstructions ``decode(encode(x))``.

The check (a venv with sae-lens, e.g. ``python3 -m venv /tmp/saelens && /tmp/saelens/bin/pip
install torch==2.13.0 && /tmp/saelens/bin/pip install sae-lens==6.54.12``) loads every DIR/<name>
with ``sae_lens.SAE.load_from_disk``, runs ``encode``/``decode`` and ``forward`` on x, and prints
per export the SAELens class, the max abs difference of codes and reconstructions from ours
(beside the largest |x_hat|, for scale), the share of rows whose active set differs, and whether
our metadata survived the load. It exits 1 if a reconstruction differs by more than 1e-4.
This file imports nothing from unsuperpose in the check step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

X_FILE = "x.safetensors"
OURS_FILE = "ours.safetensors"
TOLERANCE = 1e-4


def make(directory: Path) -> None:
    from unsuperpose.toy import ToyConfig, ToySource
    from unsuperpose.train import SAETrainConfig, get_family, new_state, train_steps
    from unsuperpose.train.grid import JUMPRELU_OPTIONS
    from unsuperpose.train.saelens import export_saelens

    toy = ToyConfig(h=32, G=64, k=3, seed=11)
    source = ToySource(toy)
    x = source.sample(4096, seed=12345)[0].float()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous()}, str(directory / X_FILE))
    knobs = {"relu": [3e-3], "topk": [4], "batchtopk": [4], "matryoshka": [4], "jumprelu": [1e-2]}
    picked = {}
    for arch, values in knobs.items():
        family = get_family(arch)
        cfg = SAETrainConfig(
            arch=arch,
            dict_sizes=[64],
            steps=600,
            batch_size=256,
            seed=0,
            jumprelu=JUMPRELU_OPTIONS,
            sparsity=values,
        )
        state = train_steps(new_state(source, cfg), source, progress=False)
        (value, n), dictionary = next(iter(state.saes().items()))
        picked[arch] = (dictionary, {"arch": arch, family.knob.name: value})
        if arch == "batchtopk":
            fresh = new_state(source, cfg)  # never trained: threshold still -1
            picked["batchtopk-unset"] = (next(iter(fresh.saes().values())), {"arch": arch})
    for name, (dictionary, meta) in picked.items():
        folder = export_saelens(
            dictionary, directory / name, metadata={**meta, "hook_name": "toy.check"}
        )
        with torch.no_grad():
            codes = dictionary.encode(x)
            x_hat = dictionary.decode(codes)
        save_file(
            {"codes": codes.contiguous(), "x_hat": x_hat.contiguous()}, str(folder / OURS_FILE)
        )
        l0 = (codes != 0).float().sum(-1).mean().item()
        print(f"{name}: exported to {folder} (our L0 on x {l0:.2f})")


def check(directory: Path) -> int:
    import sae_lens
    from sae_lens import SAE

    x = load_file(str(directory / X_FILE))["x"]
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}; {len(x)} rows of x")
    worst = 0.0
    folders = sorted(p.parent for p in directory.glob("*/cfg.json"))
    for folder in folders:
        ours = load_file(str(folder / OURS_FILE))
        cfg = json.loads((folder / "cfg.json").read_text())
        sae = SAE.load_from_disk(str(folder))
        with torch.no_grad():
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
            out = sae(x)
        d_codes = (codes - ours["codes"]).abs().max().item()
        d_hat = (x_hat - ours["x_hat"]).abs().max().item()
        d_fwd = (out - ours["x_hat"]).abs().max().item()
        flips = ((codes != 0) != (ours["codes"] != 0)).any(-1).float().mean().item()
        kept = sae.cfg.metadata.get("hook_name") == "toy.check"
        worst = max(worst, d_hat, d_fwd)
        print(
            f"{folder.name:16s} ours {cfg['metadata'].get('arch'):10s} -> SAELens "
            f"{type(sae).__name__:12s} ({cfg['architecture']}): max|dcodes| {d_codes:.3g}, "
            f"max|dx_hat| {d_hat:.3g} (forward {d_fwd:.3g}; max|x_hat| "
            f"{ours['x_hat'].abs().max().item():.3g}), rows with another active set "
            f"{flips:.4f}, L0 {(codes != 0).float().sum(-1).mean().item():.2f}, "
            f"metadata kept {kept}"
        )
    print(f"worst max abs reconstruction difference: {worst:.3g} over {len(folders)} exports")
    return 0 if folders and worst <= TOLERANCE else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--make", action="store_true", help="write the exports (run in our venv)")
    args = p.parse_args(argv)
    if args.make:
        make(args.directory)
        return 0
    return check(args.directory)


if __name__ == "__main__":
    sys.exit(main())
