"""The peers' side of ``bench_peers``: run by ``$PEERS_PYTHON`` (a venv with SAELens,
dictionary_learning and sparsify), never by our own interpreter, so it imports nothing of ours.

It draws the same synthetic batches as ``bench_peers`` (two ``torch.randn`` batches from one seed),
builds each peer's training SAE on request and times the update its own training loop runs per
batch. Commands arrive as JSON lines on stdin; answers leave as JSON lines on stdout, each after
``PEER `` because the peers' libraries print to stdout too:
- ``{"cmd": "build", "peer": NAME}``: build it, run two warm-up updates (excluded from every
  figure; the first is where dictionary_learning and sparsify initialise the decoder bias), answer
  ``{"peer", "ok": true, "step_s"}`` (the second warm-up's seconds) or ``{"peer", "na": reason}``
  when its package or class is missing;
- ``{"cmd": "time", "peer": NAME, "steps": S}``: S updates timed together, answered as
  ``{"peer", "samples_s", "dead"}`` (``dead``: the latents the peer itself counts as dead).

What each peer runs per batch (read from the installed sources; the step numbers passed to
dictionary_learning start past its threshold's start step, 1,000, as in most of a run):
- SAELens 6 (``SAETrainer``): ``fit()``'s loop body without W&B, checkpoints or progress bar,
  i.e. ``maybe_reset_sparsity()``, ``step(x)`` (their forward and loss, backward, gradient
  clipping, Adam, schedulers, dead counters), the step counter;
- dictionary_learning: ``trainer.update(step, x)``, its trainers' public protocol;
- sparsify 1.3: its ``Trainer`` trains on a live LM only, so its SAE step is driven from its
  public pieces in the order ``Trainer.fit`` uses them for the ``fvu`` loss: unit-norm decoder,
  dead mask (AuxK only), forward with the batch's variance, fired latents, the losses read on the
  host, backward, decoder gradient made tangent, its default optimiser (schedule-free SignSGD at
  its default lr), dead counters.

The ``-sparse`` standard trainers (``saelens-standard-sparse``, ``dl-standard-sparse``) are the
same steps from a trained SAE's sparsity: the encoder bias cut so that each latent fires on K/n
of the first batch's rows, at the learning rate ``held_lr`` of the spec, which holds that
sparsity while it is timed (``bench_peers``: "Why ReLU runs twice").

The k-architectures run with AuxK on (each peer's own default coefficient; sparsify's default is
off, so it runs both ways, 1/32 when on) and with the last ``dead`` latents held dead: their
encoder bias is -30 (far below any kept code on these data) and their counters start past each
peer's own dead threshold, so AuxK does its work every step, as it does in a real run.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time

import torch

DEAD_BIAS = -30.0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def batches(B: int, D: int, seed: int) -> list[torch.Tensor]:
    """The two batches ``bench_peers`` draws too (same torch, same seed, same values)."""
    torch.manual_seed(seed)
    return [torch.randn(B, D) for _ in range(2)]


def l0_thresholds(pre: torch.Tensor, l0: int) -> torch.Tensor:
    """Per-latent thresholds at which each latent fires on l0/n of the rows of ``pre`` (B, n):
    an average L0 of ``l0`` per row, the same rule ``bench_peers`` applies to ours."""
    B, n = pre.shape
    return pre.kthvalue(B - B * l0 // n, dim=0).values


class Peer:
    """A built peer: ``update(x)`` is one step of its training loop; ``dead()`` its own count."""

    def __init__(self, update, dead=lambda: 0):
        self.update, self.dead = update, dead


# -- SAELens ------------------------------------------------------------------------------------
def _saelens(spec: dict, sae_class: str, lr: float = 3e-4, **cfg_kw) -> tuple[Peer, object]:
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    B, D, N = spec["B"], spec["D"], spec["N"]
    torch.manual_seed(0)
    cfg = getattr(sae_lens, sae_class + "Config")(d_in=D, d_sae=N, **cfg_kw)
    sae = getattr(sae_lens, sae_class)(cfg)
    trainer = SAETrainer(
        # lr_end as their runner config fills it in (lr / 10; only a cosine schedule reads it)
        cfg=SAETrainerConfig(
            total_training_samples=10**12, train_batch_size_samples=B, lr=lr, lr_end=lr / 10
        ),
        sae=sae,
        data_provider=iter(()),  # unused: the batches are handed to step() below
    )
    if "k" in cfg_kw:  # AuxK's dead latents
        dead = slice(N - spec["dead"], N)
        with torch.no_grad():
            sae.b_enc[dead] = DEAD_BIAS
        trainer.n_forward_passes_since_fired[dead] = trainer.cfg.dead_feature_window + 1

    def update(x):  # SAETrainer.fit's loop body, less W&B, checkpoints and the progress bar
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return Peer(update, lambda: int(trainer.dead_neurons.sum())), sae


def saelens_standard(spec, xs):
    return _saelens(spec, "StandardTrainingSAE")[0]


def saelens_standard_sparse(spec, xs):
    peer, sae = _saelens(spec, "StandardTrainingSAE", lr=spec["held_lr"])
    with torch.no_grad():  # a trained SAE's sparsity, held (bench_peers: "Why ReLU runs twice")
        _, pre = sae.encode_with_hidden_pre(xs[0])
        sae.b_enc -= l0_thresholds(pre, spec["K"])
    return peer


def saelens_topk(spec, xs):
    return _saelens(spec, "TopKTrainingSAE", k=spec["K"])[0]


def saelens_batchtopk(spec, xs):
    return _saelens(spec, "BatchTopKTrainingSAE", k=spec["K"])[0]


def saelens_matryoshka(spec, xs):
    return _saelens(
        spec, "MatryoshkaBatchTopKTrainingSAE", k=spec["K"], matryoshka_widths=list(spec["widths"])
    )[0]


def saelens_jumprelu(spec, xs):
    peer, sae = _saelens(spec, "JumpReLUTrainingSAE")
    with torch.no_grad():  # the thresholds every implementation starts from (module docstring)
        _, pre = sae.encode_with_hidden_pre(xs[0])
        sae.threshold.copy_(l0_thresholds(pre, spec["K"]).clamp(min=1e-6))
    return peer


# -- dictionary_learning ----------------------------------------------------------------------
def _dl(spec: dict, trainer_class: str, module: str, **kw) -> tuple[Peer, object]:
    trainers = __import__(f"dictionary_learning.trainers.{module}", fromlist=[trainer_class])
    trainer = getattr(trainers, trainer_class)(
        steps=10**7,
        activation_dim=spec["D"],
        dict_size=spec["N"],
        layer=0,
        lm_name="bench",
        device="cpu",
        seed=0,
        **kw,
    )
    step = iter(range(10**9))

    def update(x):
        i = next(step)
        # step 0 is a warm-up (their decoder-bias init); later steps run past the start of the
        # threshold's averaging (step 1,000), as most of a run does
        trainer.update(i if i == 0 else 1000 + i, x)

    return Peer(update), trainer


def _dl_hold_dead(trainer, spec: dict, bias: torch.Tensor) -> Peer:
    N = spec["N"]
    with torch.no_grad():
        bias[N - spec["dead"] :] = DEAD_BIAS
    trainer.num_tokens_since_fired[N - spec["dead"] :] = trainer.dead_feature_threshold + 1
    return lambda: int((trainer.num_tokens_since_fired >= trainer.dead_feature_threshold).sum())


def dl_standard(spec, xs):
    peer, _ = _dl(spec, "StandardTrainer", "standard")
    return peer


def dl_standard_sparse(spec, xs):
    peer, tr = _dl(spec, "StandardTrainer", "standard", lr=spec["held_lr"])
    with torch.no_grad():  # a trained SAE's sparsity, held (bench_peers: "Why ReLU runs twice")
        ae = tr.ae
        ae.encoder.bias -= l0_thresholds(ae.encoder(xs[0] - ae.bias), spec["K"])
    return peer


def dl_topk(spec, xs):
    peer, tr = _dl(spec, "TopKTrainer", "top_k", k=spec["K"])
    peer.dead = _dl_hold_dead(tr, spec, tr.ae.encoder.bias)
    return peer


def dl_batchtopk(spec, xs):
    peer, tr = _dl(spec, "BatchTopKTrainer", "batch_top_k", k=spec["K"])
    peer.dead = _dl_hold_dead(tr, spec, tr.ae.encoder.bias)
    return peer


def dl_matryoshka(spec, xs):
    N, widths = spec["N"], spec["widths"]
    sizes = [b - a for a, b in zip([0, *widths[:-1]], widths)]
    peer, tr = _dl(
        spec,
        "MatryoshkaBatchTopKTrainer",
        "matryoshka_batch_top_k",
        k=spec["K"],
        group_fractions=[s / N for s in sizes],
    )
    peer.dead = _dl_hold_dead(tr, spec, tr.ae.b_enc)
    return peer


def dl_jumprelu(spec, xs):
    peer, tr = _dl(spec, "JumpReluTrainer", "jumprelu")
    with torch.no_grad():  # the thresholds every implementation starts from (module docstring)
        ae = tr.ae
        ae.threshold.copy_(l0_thresholds(xs[0] @ ae.W_enc + ae.b_enc, spec["K"]).clamp(min=1e-6))
    return peer


# -- sparsify -------------------------------------------------------------------------------
def _sparsify(spec: dict, auxk_alpha: float) -> Peer:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    B, D, N = spec["B"], spec["D"], spec["N"]
    dead_threshold = 10_000_000  # TrainConfig.dead_feature_threshold's default
    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=spec["K"]), "cpu", dtype=torch.float32)
    # TrainConfig's default optimiser ("signum") at its default lr for this many latents
    opt = ScheduleFreeWrapper(
        SignSGD([dict(params=sae.parameters(), lr=5e-3 / (N / 2**14) ** 0.5)]), momentum=0.95
    )
    opt.train()
    since_fired = torch.zeros(N, dtype=torch.long)
    did_fire = torch.zeros(N, dtype=torch.bool)
    if auxk_alpha > 0:
        with torch.no_grad():
            sae.encoder.bias[N - spec["dead"] :] = DEAD_BIAS
        since_fired[N - spec["dead"] :] = dead_threshold + 1
    first = [True]

    def update(x):
        if first[0]:  # Trainer.fit's first step: the decoder bias starts at the batch mean
            sae.b_dec.data = x.mean(0)
            first[0] = False
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the trainer reads its losses on the host every step
        if auxk_alpha > 0:
            float(out.auxk_loss.detach())
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(B)
        since_fired[did_fire] = 0
        did_fire.zero_()

    return Peer(update, lambda: int((since_fired > dead_threshold).sum()))


def sparsify_topk(spec, xs):
    return _sparsify(spec, 1 / 32)


def sparsify_topk_noauxk(spec, xs):
    return _sparsify(spec, 0.0)


BUILDERS = {
    "saelens-standard": saelens_standard,
    "dl-standard": dl_standard,
    "saelens-standard-sparse": saelens_standard_sparse,
    "dl-standard-sparse": dl_standard_sparse,
    "sparsify-topk": sparsify_topk,
    "sparsify-topk-noauxk": sparsify_topk_noauxk,
    "saelens-topk": saelens_topk,
    "dl-topk": dl_topk,
    "saelens-batchtopk": saelens_batchtopk,
    "dl-batchtopk": dl_batchtopk,
    "saelens-matryoshka": saelens_matryoshka,
    "dl-matryoshka": dl_matryoshka,
    "saelens-jumprelu": saelens_jumprelu,
    "dl-jumprelu": dl_jumprelu,
}
PACKAGES = {"saelens": "sae-lens", "dl": "dictionary-learning", "sparsify": "eai-sparsify"}


def timed(peer: Peer, xs: list[torch.Tensor], steps: int) -> float:
    """Seconds per update over ``steps`` updates, the batches alternating."""
    t = time.perf_counter()
    for i in range(steps):
        peer.update(xs[i % 2])
    return (time.perf_counter() - t) / steps


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    xs = batches(spec["B"], spec["D"], spec["seed"])
    versions = {p: _version(p) for p in ("torch", *PACKAGES.values())}

    def say(obj):
        print("PEER " + json.dumps(obj), flush=True)

    say({"ready": True, "checksum": [float(x.double().sum()) for x in xs], "versions": versions})
    peers: dict[str, Peer] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["peer"]
        if cmd["cmd"] == "build":
            package = PACKAGES[name.split("-")[0]]
            if versions[package] is None:
                say({"peer": name, "na": f"{package} is not installed in this venv"})
                continue
            try:
                peer = BUILDERS[name](spec, xs)
            except (ImportError, AttributeError, TypeError) as e:  # an API this version lacks
                say({"peer": name, "na": f"{package} {versions[package]}: {e!r}"})
                continue
            peer.update(xs[0])
            step_s = timed(peer, xs, 1)  # the second warm-up, timed to size the measurements
            peers[name] = peer
            say({"peer": name, "ok": True, "step_s": step_s})
        elif cmd["cmd"] == "time":
            peer = peers[name]
            step_s = timed(peer, xs, cmd["steps"])
            say({"peer": name, "samples_s": spec["B"] / step_s, "dead": peer.dead()})


if __name__ == "__main__":
    main()
