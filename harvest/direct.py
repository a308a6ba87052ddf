"""Hook points of a TransformerLens bridge, read on the plain Hugging Face model it wraps.

``TransformerBridge`` puts its components into the HF model's own module tree, so every forward
of that model runs through them, and some add work to every batch. In transformer_lens 4.3 each
RMSNorm is computed twice (``NormalizationBridge`` normalises the input itself for ``hook_scale``
and ``hook_normalized``, then calls the HF module), attention rebuilds its mask, and the bridge
runs eager attention.

Most hook points a harvest wants are simply the input or the output of a module HF calls anyway:
``blocks.L.mlp.hook_post`` is the input of the MLP's down projection (``down_proj``, GPT-2's
``c_proj``), ``blocks.L.hook_resid_post`` the output of decoder layer L. :class:`DirectForward`
reads those with plain PyTorch hooks on those modules, in a forward of a *view* of the model in
which every bridge component is replaced by the module it wraps. The view shares the weights
(nothing is copied but the containers above a bridge component) and leaves the bridge as it was.
The forward ends the moment the last hook point has been read, so nothing past it is computed:
harvesting ``mlp.hook_post`` of layer L does not even run layer L's down projection.

The bridge stays the authority on names: a hook point's meaning comes from the bridge's own
alias table, and before relying on this path a harvest compares the two on a few tokens
(:func:`disagreeing`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch


class _Stop(Exception):
    """Raised by the last capture: every hook point of the batch has been read."""


def _wrapped(module: torch.nn.Module) -> torch.nn.Module | None:
    """The HF module a bridge component wraps, or None when ``module`` is not one."""
    if "_original_component" in getattr(module, "_modules", {}):
        return module._modules["_original_component"]
    return None


class DirectForward:
    """The plain HF model inside ``bridge``, and which hook points it can read directly.

    ``hook_dict``'s names resolve (through the bridge's aliases) to ``<component>.hook_in`` or
    ``<component>.hook_out``; when that component wraps an HF module, the hook point is that
    module's first input or (first) output. Anything else (``hook_scale``, attention patterns,
    hooks the bridge computes itself) is not direct: :meth:`route` returns None for it.
    """

    def __init__(self, bridge: Any):
        self.bridge = bridge
        model = bridge.original_model
        self._shared = getattr(model, "config", None)
        # The bridge sets eager attention on the config it shares with the HF modules; the view
        # gets its own copy with PyTorch's fused attention, HF's own default: it made the forward
        # up to the harvested layer 1.2x (SmolLM2, layer 2) to 3x (the tiny GPT-2, layer 1)
        # faster here, and agrees with eager to float rounding.
        # A model with sub-configs (whose modules would still read the bridge's) keeps eager.
        self.config = copy.deepcopy(self._shared)
        if (
            self.config is not None
            and not getattr(self.config, "sub_configs", None)
            and getattr(type(model), "_supports_sdpa", False)
        ):
            self.config._attn_implementation = "sdpa"
        self._views: dict[int, torch.nn.Module] = {}  # id(HF module) -> its module in the view
        self.model = self._view(model)

    def _view(self, module: torch.nn.Module) -> torch.nn.Module:
        inner = _wrapped(module)
        while inner is not None:
            module, inner = inner, _wrapped(inner)
        if id(module) in self._views:
            return self._views[id(module)]
        children = {
            name: None if child is None else self._view(child)
            for name, child in module._modules.items()
        }
        view = module
        # Every module that reads the config is copied too, so the mask a model builds and the
        # attention its layers run agree on the implementation.
        reads_config = self._shared is not None and getattr(module, "config", None) is self._shared
        if reads_config or any(children[n] is not c for n, c in module._modules.items()):
            if "forward" in vars(module):
                # A forward patched onto the instance (Accelerate's offloading does this) is bound
                # to the original module and would run the bridged children: no view of it.
                raise _NoView(type(module).__name__)
            view = copy.copy(module)  # attributes shared, the children's table its own
            view._modules = children
            if reads_config:
                view.config = self.config
        self._views[id(module)] = view
        return view

    @classmethod
    def of(cls, bridge: Any) -> DirectForward | None:
        """The direct path of ``bridge``; None for a stand-in or a model that cannot be viewed."""
        if not isinstance(getattr(bridge, "original_model", None), torch.nn.Module):
            return None
        try:
            return cls(bridge)
        except _NoView:
            return None

    def route(self, hooks: list[str]) -> Callable[[torch.Tensor], dict] | None:
        """``ids -> {hook: activation}`` on the view, or None if a hook is not direct."""
        sites = self.sites(hooks)
        return None if sites is None else functools.partial(self.run, sites=sites)

    def sites(self, hooks: list[str]) -> dict[str, tuple[torch.nn.Module, str]] | None:
        """hook name -> (module in the view, "in" or "out") for every hook, or None if any one is
        not the plain input or output of an HF module."""
        found = {}
        for hook in hooks:
            point = self.bridge.hook_dict.get(hook)
            owner, _, kind = str(getattr(point, "name", "")).rpartition(".")
            if kind not in ("hook_in", "hook_out") or not owner:
                return None
            try:
                component = self.bridge.get_submodule(owner)
            except AttributeError:
                return None
            inner = _wrapped(component)
            if inner is None:
                return None
            while _wrapped(inner) is not None:
                inner = _wrapped(inner)
            if id(inner) not in self._views:
                return None  # a component outside the model's forward (none known today)
            found[hook] = (self._views[id(inner)], "in" if kind == "hook_in" else "out")
        return found

    def run(self, ids: torch.Tensor, sites: dict[str, tuple[torch.nn.Module, str]]) -> dict:
        """hook name -> activation (detached) for the token ids ``ids`` (batch, n_ctx); the
        forward stops once all of them are read. Call inside ``torch.inference_mode()``."""
        got: dict[str, torch.Tensor] = {}

        def keep(hook: str, x: Any) -> None:
            got[hook] = (x[0] if isinstance(x, tuple) else x).detach()
            if len(got) == len(sites):
                raise _Stop

        def before(hook: str):
            def fn(module, args, kwargs):
                first = next(iter(kwargs.values()), None)
                keep(hook, args[0] if args else kwargs.get("hidden_states", first))

            return fn

        def after(hook: str):
            return lambda module, args, out: keep(hook, out)

        handles = [
            module.register_forward_pre_hook(before(hook), with_kwargs=True)
            if kind == "in"
            else module.register_forward_hook(after(hook))
            for hook, (module, kind) in sites.items()
        ]
        try:
            # use_cache=False: a key/value cache is work no harvest reads.
            self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = set(sites) - set(got)
        if missing:
            raise RuntimeError(f"the forward pass never reached {sorted(missing)}")
        return got


class _NoView(Exception):
    """The model has a module the view cannot stand in for."""


def disagreeing(direct: dict, bridged: dict, precision: str) -> list[str]:
    """Hook names whose direct activations differ from the bridge's beyond rounding (or that one
    of the two paths did not produce).

    fp32: the same weights and HF modules, only attention's kernel differs (sdpa here, eager in
    the bridge): float rounding apart, ~1e-6 relative. bf16 autocast: bf16's rounding apart.
    """
    tol = 1e-4 if precision == "fp32" else 2e-2
    bad = []
    for hook in sorted(set(direct) | set(bridged)):
        got, ref = direct.get(hook), bridged.get(hook)
        if got is None or ref is None or got.shape != ref.shape:
            bad.append(hook)
            continue
        ref, got = ref.float(), got.float()
        if (got - ref).abs().max() > tol * max(float(ref.abs().max()), 1e-6):
            bad.append(hook)
    return bad
