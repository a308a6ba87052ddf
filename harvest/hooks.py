"""Which hooks a harvest reads and where each one's store goes: layers and hook templates
checked against the model's hook points, and the hook after which a forward pass may stop."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from unsuperpose import storage

from .config import DEFAULT_HOOK, HarvestConfig, HarvestError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")


@dataclass(frozen=True)
class Target:
    """One hook to harvest into one store."""

    hook: str
    layer: int | None
    path: storage.Location  # a local folder or an object-store URL


def store_name(hook: str, layer: int | None) -> str:
    """``layer<L>.zarr`` for the default MLP hook (the Makefile expects it), else the hook name."""
    if layer is not None and hook == DEFAULT_HOOK.format(layer=layer):
        return f"layer{layer}.zarr"
    return f"{hook}.zarr"


def parse_layers(text: str, n_layer: int) -> list[int]:
    text = str(text).strip()
    if text == "all":
        return list(range(n_layer))
    try:
        layers = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise HarvestError(
            f"layer={text!r}: give a layer index, indices like 1,3, or 'all'"
        ) from None
    bad = [L for L in layers if not 0 <= L < n_layer]
    if not layers or bad:
        raise HarvestError(f"layer={text!r}: this model has layers 0..{n_layer - 1}")
    return layers


def asked_hooks(cfg: HarvestConfig, n_layer: int) -> list[tuple[str, int | None]]:
    """(hook name, layer) of every store ``cfg`` asks for."""
    if "{layer}" in cfg.hook:
        return [(cfg.hook.format(layer=L), L) for L in parse_layers(cfg.layer, n_layer)]
    m = _BLOCK.match(cfg.hook)
    return [(cfg.hook, int(m.group(1)) if m else None)]


def planned_stores(
    cfg: HarvestConfig, n_layer: int, out_dir: storage.Location
) -> list[storage.Location]:
    """The stores a harvest of ``cfg`` writes, known before the model is loaded (what the
    command locks first); its hooks are checked against the model later."""
    return [storage.location(out_dir) / store_name(h, L) for h, L in asked_hooks(cfg, n_layer)]


def resolve_targets(
    cfg: HarvestConfig, hook_names: Any, n_layer: int, out_dir: storage.Location
) -> list[Target]:
    """Hook templates + layers -> concrete hook names, each checked against the model's hooks."""
    pairs = asked_hooks(cfg, n_layer)
    for hook, _ in pairs:
        if hook not in hook_names:
            close = difflib.get_close_matches(hook, list(hook_names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarvestError(
                f"the model has no hook point {hook!r}{hint} (hook={cfg.hook!r}); its layers "
                f"are 0..{n_layer - 1} and its bridge offers: "
                + ", ".join(hook_templates(hook_names))
            )
    return [Target(h, L, storage.location(out_dir) / store_name(h, L)) for h, L in pairs]


def hook_templates(hook_names: Any) -> list[str]:
    """The bridge's hook names with the layer written ``{layer}`` (one entry per kind of hook),
    the usual SAE targets first."""
    names = sorted({_BLOCK.sub("blocks.{layer}.", h) for h in hook_names})
    usual = [
        h
        for h in (
            DEFAULT_HOOK,
            "blocks.{layer}.hook_resid_post",
            "blocks.{layer}.hook_attn_out",
            "blocks.{layer}.hook_mlp_out",
        )
        if h in names
    ]
    return usual + [h for h in names if h not in usual]


def stop_hook(targets: list[Target]) -> str | None:
    """The hook point after which the forward pass can stop (None: run the whole model).

    TransformerLens' ``stop_at_layer`` still computes the logits when the last block is needed,
    and the 50,257-way unembedding costs several times the blocks; ending the pass by raising
    from the output hook of the last needed block skips it in every case.
    """
    last = -1
    for t in targets:
        m = _BLOCK.match(t.hook)
        if m:
            last = max(last, int(m.group(1)))
        elif not t.hook.startswith(_EMBED):
            return None  # e.g. ln_final: past the last block
    return f"blocks.{max(last, 0)}.hook_out"
