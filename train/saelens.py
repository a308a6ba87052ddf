"""Export any dictionary in SAELens's on-disk format, as the SAELens architecture that computes
what ours does, so SAELens users load what we trained and get our reconstructions.

A folder with ``cfg.json`` and ``sae_weights.safetensors`` (float32). Every architecture writes
W_enc (d_in x d_sae), b_enc (d_sae), W_dec (d_sae x d_in) and b_dec (d_in); SAELens's inference
SAEs (sae-lens 6.54.12, ``SAE.load_from_disk(folder)``) compute, with apply_b_dec_to_input true
and normalize_activations "none" (``SAE.process_sae_in``: sae_in = x - b_dec):

    pre   = (x - b_dec) @ W_enc + b_enc                         every architecture
    x_hat = codes @ W_dec + b_dec                               every architecture

which is our ``AffineSAE`` layout. How ``codes`` follow from ``pre``, per architecture (the row an
architecture takes is its family's ``saelens`` record, ``train.registry.SAELens``; a family
without one is refused with its ``saelens_refusal``):

    ours        SAELens "architecture"       SAELens codes                 ours
    relu        standard                     ReLU(pre)                     ReLU(x @ W_enc + b_enc)
    topk        topk (k, rescale_acts_by_    TopK: the k largest pre per   the k largest of
                decoder_norm false)          row, ReLU'd, others 0         ReLU(pre), others 0
    batchtopk   jumprelu (threshold: the     ReLU(pre) * (pre > threshold) ReLU(pre) * (pre > t)
                shared t in all d_sae)
    matryoshka  jumprelu, as batchtopk       as batchtopk                  as batchtopk
    jumprelu    jumprelu (threshold (d_sae)) ReLU(pre) * (pre > threshold) pre * (pre > threshold)

Why they are equal:
- relu: our decoder has no bias, so b_dec is written as zeros and both formulas reduce to ours;
  W_dec is our unit-norm ``dictionary()``, W_enc our ``encoder_weight()`` (built when tied).
- topk: the k largest of pre and of ReLU(pre) agree on every positive entry; the rest are 0 in
  both (only the index of a zero may differ). SAELens's k is an int <= d_sae: we write the k the
  dictionary used, capped at d_sae as training caps it. rescale_acts_by_decoder_norm is false
  (our decoder rows are unit norm anyway, and the flag would change the top-k selection).
- batchtopk, matryoshka: SAELens has no BatchTopK or Matryoshka *inference* SAE; its own
  BatchTopK and MatryoshkaBatchTopK training SAEs save as "jumprelu" with the learnt threshold
  repeated over d_sae (``BatchTopKTrainingSAE.process_state_dict_for_saving_inference``), which is
  our inference rule exactly. The nested prefixes only shape Matryoshka's training loss: they are
  kept as metadata (``training_architecture_details.matryoshka_widths``, SAELens's name).
  A BatchTopK threshold still at -1 (never estimated) makes ours fall back to the per-row top k:
  such a dictionary is written as SAELens "topk" with its k, which is that rule.
- jumprelu: ReLU(pre) * (pre > t) = pre * (pre > t) for every t >= 0; our thresholds are
  exp(log theta) > 0. A negative threshold has no SAELens equivalent (SAELens zeroes the
  negative codes between t and 0 that ours keeps): exporting one raises ValueError.

``metadata.sae_lens_version`` is set: SAELens 6 treats a cfg.json without it as a pre-6.0 config
(``handle_config_defaulting``) and drops our whole metadata block on load.
``tests/test_saelens_export.py`` re-implements these SAELens formulas;
``benchmarks/check_saelens_export.py`` checks exports against the real package.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from unsuperpose.config import write_bytes_atomic, write_json_atomic
from unsuperpose.train.layout import SAELENS_DIR, dict_dirname
from unsuperpose.train.registry import DEFAULT_ARCH, FAMILIES, SAELens

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
# The SAELens release whose format this writes (read from its source and checked by loading).
SAELENS_VERSION = "6.54.12"


def _mapping(dictionary) -> tuple[str, SAELens]:
    """(architecture, its family's SAELens mapping); ValueError with the family's refusal when
    it has none."""
    arch = getattr(dictionary, "arch", DEFAULT_ARCH)
    family = FAMILIES.get(arch)
    if family is None or family.saelens is None:
        exportable = sorted(a for a, f in FAMILIES.items() if f.saelens is not None)
        why = "" if family is None else f": {family.saelens_refusal}"
        raise ValueError(
            f"no SAELens export for architecture {arch!r}{why} (exportable: {exportable})"
        )
    return arch, family.saelens


def _threshold_unset(dictionary) -> bool:
    """A BatchTopK threshold never estimated (-1): ours encodes by the per-row top k."""
    return bool((dictionary.threshold < 0).any())


def saelens_architecture(dictionary) -> str:
    """The SAELens architecture ``dictionary`` is exported as."""
    _, mapping = _mapping(dictionary)
    if mapping.topk_while_unset and _threshold_unset(dictionary):
        return "topk"
    return mapping.architecture


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().contiguous()


def export_saelens(dictionary, directory: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``dictionary`` to ``directory`` in SAELens's format, as its family's SAELens
    mapping says (``Family.saelens``); ``metadata`` goes into cfg.json's metadata block. A family
    without one is refused with its reason (``Family.saelens_refusal``)."""
    arch, mapping = _mapping(dictionary)
    target = saelens_architecture(dictionary)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields: dict = {}
    extra_meta: dict = {"sae_lens_version": SAELENS_VERSION, "arch": arch}
    with torch.no_grad():
        if not hasattr(dictionary, "b_dec"):  # the report's layout: no decoder bias
            tensors = {
                "W_enc": _cpu(dictionary.encoder_weight()),
                "b_enc": _cpu(dictionary.b_enc),
                "W_dec": _cpu(dictionary.dictionary()),
                "b_dec": torch.zeros(dictionary.d_in),
            }
        else:
            tensors = {
                k: _cpu(getattr(dictionary, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")
            }
        if mapping.training_architecture is not None:
            details = {"k": int(dictionary.config["k"])}
            if "prefix_sizes" in dictionary.config:
                details["matryoshka_widths"] = [int(m) for m in dictionary.config["prefix_sizes"]]
            extra_meta["training_architecture"] = mapping.training_architecture
            extra_meta["training_architecture_details"] = details
        if target == "topk":
            fields = {
                "k": min(int(dictionary.config["k"]), dictionary.d_sae),
                "rescale_acts_by_decoder_norm": False,
            }
        elif target == "jumprelu":
            threshold = _cpu(dictionary.threshold).reshape(-1).expand(dictionary.d_sae)
            if bool((threshold < 0).any()):
                raise ValueError(
                    f"a {arch} dictionary with a negative threshold ({threshold.min().item():g}) "
                    "has no SAELens equivalent: SAELens's JumpReLU is ReLU(pre) * (pre > t)"
                )
            tensors["threshold"] = threshold.contiguous()
    write_bytes_atomic(directory / WEIGHTS, safetensors_bytes(tensors))
    write_json_atomic(
        directory / CONFIG,
        {
            "d_in": dictionary.d_in,
            "d_sae": dictionary.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **fields,
            "architecture": target,
            "metadata": {"exported_by": "unsuperpose", **extra_meta, **(metadata or {})},
        },
    )
    return directory


def grid_metadata(cfg, source_info: dict) -> dict:
    """What every SAELens export of a grid trained on an LM store records besides its own knob
    value: the store's hook, layer and model (``source_info``, the store's ``describe()``), the
    architecture, the knob's name and the L1 convention where the family has one."""
    family = cfg.family
    meta = {
        k: source_info.get(k)
        for k in ("hook", "layer", "model_dir", "weights_sha256")
        if k in source_info
    }
    meta.update(hook_name=source_info.get("hook"), arch=cfg.arch, sparsity_name=family.knob.name)
    if "l1_norm" in family.settings:
        meta["l1_norm"] = cfg.l1_norm
    return meta


def export_grid(state, folder: str | Path, cfg, source_info: dict) -> str | None:
    """Every dictionary of a trained grid ``state`` in SAELens's format under
    ``<folder>/saelens/<dictionary>/``, with ``grid_metadata``. Returns None, or why the
    architecture has no export (its ``saelens_refusal``; nothing is written then)."""
    family = cfg.family
    if family.saelens is None:
        return f"no SAELens export for {cfg.arch}: {family.saelens_refusal}"
    meta = grid_metadata(cfg, source_info)
    knob = family.knob.name
    for (value, n), dictionary in state.saes().items():
        export_saelens(
            dictionary,
            Path(folder) / SAELENS_DIR / dict_dirname(cfg.arch, knob, value, n),
            metadata={**meta, "sparsity": value, knob: value},
        )
    return None
