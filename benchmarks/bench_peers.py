"""Each architecture's training step against the step its peers' own trainers
run, in one run (`make bench ARGS=bench_peers`).

Peers, each driven through its own trainer by ``benchmarks/peers_worker.py`` in the interpreter
``$PEERS_PYTHON`` (default /tmp/peers/bin/python; a venv with sae-lens, dictionary-learning and
eai-sparsify; without one only our side runs and every peer reads "n/a"):
- relu: SAELens standard, dictionary_learning's standard trainer, twice: from a fresh SAE
  (``relu``) and from a trained SAE's sparsity (``relu-sparse``, below);
- topk: sparsify with AuxK (1/32) and without (its default), SAELens TopK, dictionary_learning TopK;
- batchtopk: SAELens BatchTopK, dictionary_learning BatchTopK;
- matryoshka: SAELens Matryoshka BatchTopK, dictionary_learning's Matryoshka trainer;
- jumprelu: SAELens JumpReLU, dictionary_learning JumpReLU.
Ours is our trainer (``train_steps``: the registered fast path, fused Adam, the dead counters,
decoder renormalisation), fed from memory (``RamSource``).

Same work on every side: the same two ``torch.randn`` batches from one seed, drawn in both
processes (their sums are compared before anything is timed); k 32 (``K``); the k-architectures
with AuxK on and the last n/16 latents held dead (encoder bias -30, counters past each one's own
dead threshold) so that AuxK works every step, as in a real run; JumpReLU's thresholds set where
each latent fires on 32/n of the first batch's rows (L0 32), in every implementation; matryoshka's
prefixes ours (1/16, 1/8, 1/4, 1/2, 1 of n) in all three. Each side uses ``THREADS`` torch threads,
and only one side computes at a time.

Why ReLU runs twice: a fresh ReLU SAE lets about half its latents through, so its first steps are
dense on every side, and a dense ReLU step is five encoder-sized GEMMs. A trained one runs at an L0
of tens, where our step takes its sparse CSR path (``sparse_below``) and the peers' steps stay
dense. ``relu-sparse`` starts every side's encoder bias lowered so that each latent fires on K/n
of the first batch's rows (L0 K, the rule JumpReLU's thresholds follow), the regime most of a
ReLU run is spent in. These random batches hold no equilibrium for that sparsity: at the default
learning rates, Adam lifts the L0 from 32 to 70-190 within one measurement. So this row trains at
a learning rate of ``HELD_LR`` on every side, which holds the sparsity where it was set and leaves
the work of a step unchanged (every product, the Adam update, the dead counters). Its round
records say what our side actually ran: the share of timed steps that took the sparse path, and
the L0 on the first batch after the measurement.

Shapes: 1024 -> 8192 at batch 4,096, and 256 -> 2,048 at batch 1,024. In each round, for each
architecture: the GEMM peak of the encoder's shape, ours, each peer, the GEMM peak again (the
order reversed in odd rounds). Each entry runs two warm-up steps when it is built (excluded), then
in every round the same number of steps, chosen once so a measurement lasts about
``PEERS_TARGET_S`` seconds. Figures per round: samples/s, ours / each peer (a peer is compared
with ours in the same setting: sparsify without AuxK with ours without AuxK), and each rate as a
fraction of the encoder GEMM alone at the round's peak (the better of its two reads):
``rate * 2*d*n / peak``, the floor of a sparse step (the k-architectures' goal is >= 0.5; a dense
ReLU step has five such GEMMs, so 0.2 is its ceiling). The summary per shape and architecture
takes medians over the rounds and says whether its goals are met: ours >= 1.5x the
fastest peer; relu >= 2x SAELens; the k-architectures within 2x of the encoder GEMM.

Every round record carries the machine's load averages: the figures of one round are comparable,
those of a loaded machine are not a quiet machine's.

Knobs: ``PEERS_QUICK=1`` (a smoke run: 64 -> 512, batch 256, k 8, one round, ~1-2 minutes),
``PEERS_SHAPES`` (large,small), ``PEERS_ARCHS`` (all five), ``PEERS_ROUNDS`` (3),
``PEERS_TARGET_S`` (3 seconds per measurement), ``PEERS_THREADS`` (2), ``PEERS_PYTHON``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    RamSource,
    first_pre_activations,
    gemm_peak,
    git_commit,
    hold_dead,
    peers_python,
    set_l0_bias,
    set_l0_thresholds,
)
from unsuperpose.train import SAETrainConfig, new_state, train_steps
from unsuperpose.train.config import AuxKOptions
from unsuperpose.train.families.auxk import dead_for_auxk
from unsuperpose.train.families.matryoshka import prefix_sizes

SHAPES = {"large": (4096, 1024, 8192), "small": (1024, 256, 2048)}  # batch, d, n
QUICK_SHAPES = {"quick": (256, 64, 512)}
K, QUICK_K = 32, 8
THREADS = 2
SEED = 0
WORKER = Path(__file__).with_name("peers_worker.py")
K_ARCHS = ("topk", "batchtopk", "matryoshka")

# Our entries per architecture: name -> SAETrainConfig overrides.
OURS = {
    "relu": {"ours": {}},
    "relu-sparse": {"ours": {"lr": 1e-8}},
    "topk": {"ours": {}, "ours-noauxk": {"auxk": AuxKOptions(coef=0.0)}},
    "batchtopk": {"ours": {}},
    "matryoshka": {"ours": {}},
    "jumprelu": {"ours": {}},
}
# The peers per architecture: peer -> the entry of ours it is compared with.
PEERS = {
    "relu": {"saelens-standard": "ours", "dl-standard": "ours"},
    "relu-sparse": {"saelens-standard-sparse": "ours", "dl-standard-sparse": "ours"},
    "topk": {
        "sparsify-topk": "ours",
        "sparsify-topk-noauxk": "ours-noauxk",
        "saelens-topk": "ours",
        "dl-topk": "ours",
    },
    "batchtopk": {"saelens-batchtopk": "ours", "dl-batchtopk": "ours"},
    "matryoshka": {"saelens-matryoshka": "ours", "dl-matryoshka": "ours"},
    "jumprelu": {"saelens-jumprelu": "ours", "dl-jumprelu": "ours"},
}
# What a peer does not have at all (printed as n/a beside the figures).
LACKS = {
    arch: {"sparsify": "sparsify 1.3 trains TopK (and GroupMax) coders only"}
    for arch in ("relu", "relu-sparse", "batchtopk", "matryoshka", "jumprelu")
}
# Rows that are not an architecture's own name: row -> the architecture it trains.
ARCH_OF = {"relu-sparse": "relu"}
HELD_LR = OURS["relu-sparse"]["ours"]["lr"]  # the peers' learning rate in that row too


def arch_of(row: str) -> str:
    return ARCH_OF.get(row, row)


def batches(B: int, D: int, seed: int = SEED) -> list[torch.Tensor]:
    """The two batches; ``peers_worker.batches`` draws the same ones."""
    torch.manual_seed(seed)
    return [torch.randn(B, D) for _ in range(2)]


class Ours:
    """One SAE of ours, trained by our trainer on the two batches; ``rate(steps)`` times it."""

    def __init__(self, row: str, xs: list[torch.Tensor], n: int, k: int, dead: int, **overrides):
        arch = arch_of(row)
        value = 1e-3 if arch in ("relu", "jumprelu") else k
        self.B = len(xs[0])
        cfg = SAETrainConfig(
            arch=arch,
            dict_sizes=[n],
            batch_size=self.B,
            # short, so BatchTopK's threshold averaging (from 20% of the steps) runs in every
            # timed step, as in most of a run; nothing else reads it
            steps=10,
            log_every=10**9,  # the trainer logs at the end of every timed call only
            sparsity=[value],
            **overrides,
        )
        self.src = RamSource(xs)
        self.state = new_state(self.src, cfg)
        g = self.group = self.state.groups[0]
        if arch == "jumprelu":
            set_l0_thresholds(g, xs[0], k)
        if row == "relu-sparse":
            set_l0_bias(g, xs[0], k)
        self.x0 = xs[0]
        if arch in K_ARCHS and cfg.auxk.coef > 0 and dead:
            hold_dead(g, dead)  # the module docstring's dead latents
        self.step_s = self._time(1)  # warm-up (the first step allocates)
        self.step_s = self._time(1)

    def _time(self, steps: int) -> float:
        t = time.perf_counter()
        train_steps(self.state, self.src, until=self.state.step + steps, progress=False)
        return (time.perf_counter() - t) / steps

    def rate(self, steps: int) -> tuple[float, int]:
        """Samples/s over ``steps`` trainer steps, and the latents AuxK counts as dead."""
        sparse = getattr(self.group, "sparse_steps", 0)
        rate = self.B / self._time(steps)
        self.sparse_share = (getattr(self.group, "sparse_steps", 0) - sparse) / steps
        return rate, int(dead_for_auxk(self.group).sum())

    def relu_l0(self) -> float:
        """The first dictionary's mean L0 on the first batch now (ReLU rows)."""
        return float((first_pre_activations(self.group, self.x0) > 0).sum(1).float().mean())


class PeerProcess:
    """The peers' worker in its own interpreter: builds peers and times them on request."""

    def __init__(self, exe: str, spec: dict):
        self.proc = subprocess.Popen(
            [exe, str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("PEER "):
                return json.loads(line[5:])
        raise RuntimeError(f"the peers' worker exited ({self.proc.wait()}); see its stderr above")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def _peak(B: int, D: int, N: int) -> float:
    """The encoder GEMM's GFLOP/s now, over ~20 GFLOP (3 products at the large shape, 19 at the
    small one) so a small shape's read is not one scheduler tick; at most 200 products."""
    return gemm_peak(B, D, N, reps=max(3, min(200, math.ceil(2e10 / (2 * B * D * N)))))


def _steps_for(step_s: float, target_s: float) -> int:
    return max(2, min(100, math.ceil(target_s / max(step_s, 1e-6))))


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_shape(
    shape: str,
    B: int,
    D: int,
    N: int,
    k: int,
    *,
    archs: list[str],
    rounds: int,
    target_s: float,
    exe: str | None,
):
    """Records of one shape: its setup, one per round and architecture, one summary each."""
    dead = N // 16
    widths = prefix_sizes(SAETrainConfig().matryoshka.prefixes, N)
    xs = batches(B, D)
    checksum = [float(x.double().sum()) for x in xs]
    spec = {"B": B, "D": D, "N": N, "K": k, "dead": dead, "widths": widths}
    spec.update(threads=torch.get_num_threads(), seed=SEED, held_lr=HELD_LR)
    worker = PeerProcess(exe, spec) if exe else None
    na: dict[str, dict[str, str]] = {a: dict(LACKS.get(a, {})) for a in archs}
    try:
        ours_torch = importlib.metadata.version("torch")
        if worker and worker.hello["versions"]["torch"] != ours_torch:
            # Another torch is other kernels: the ratios would compare versions, not trainers.
            raise RuntimeError(
                f"the peers' venv runs torch {worker.hello['versions']['torch']}, ours"
                f" {ours_torch}: install torch=={ours_torch.split('+')[0]} into it together with"
                " the peers (docs/development.md shows the commands)"
            )
        if worker and worker.hello["checksum"] != checksum:
            raise RuntimeError(
                f"the peers' batches differ from ours ({worker.hello['checksum']} vs {checksum}):"
                " the two venvs draw random numbers differently (torch versions?)"
            )
        entries: dict[str, dict[str, object]] = {}  # arch -> name -> Ours | "peer"
        steps: dict[str, int] = {}
        for arch in archs:
            entries[arch] = {}
            for name, overrides in OURS[arch].items():
                ours = Ours(arch, xs, N, k, dead, **overrides)
                entries[arch][name] = ours
                steps[f"{arch}/{name}"] = _steps_for(ours.step_s, target_s)
            for peer in PEERS[arch]:
                if worker is None:
                    na[arch][peer] = "no peers venv: set PEERS_PYTHON"
                    continue
                built = worker.ask(cmd="build", peer=peer)
                if "na" in built:
                    na[arch][peer] = built["na"]
                    continue
                entries[arch][peer] = "peer"
                steps[f"{arch}/{peer}"] = _steps_for(built["step_s"], target_s)
        yield {
            "figure": "peers_setup",
            "shape": f"{D}->{N}, batch {B}, k {k}",
            "commit": git_commit(),
            "threads": torch.get_num_threads(),
            "dead_latents_held": dead,
            "matryoshka_widths": widths,
            "versions": worker.hello["versions"] if worker else None,
            "same_batches": worker is not None,
            "steps_per_measurement": steps,
            "na": {a: v for a, v in na.items() if v},
        }
        floor_flops = 2 * D * N  # the encoder GEMM's FLOPs per sample
        history: dict[str, list[dict]] = {a: [] for a in archs}
        for r in range(rounds):
            for arch in archs:
                before = _peak(B, D, N)
                order = list(entries[arch]) if r % 2 == 0 else list(reversed(entries[arch]))
                rate, dead_seen = {}, {}
                for name in order:
                    s = steps[f"{arch}/{name}"]
                    if name in OURS[arch]:
                        rate[name], dead_seen[name] = entries[arch][name].rate(s)
                    else:
                        got = worker.ask(cmd="time", peer=name, steps=s)
                        rate[name], dead_seen[name] = got["samples_s"], got["dead"]
                after = _peak(B, D, N)
                peak = max(before, after)
                floor = peak * 1e9 / floor_flops  # samples/s of the encoder GEMM alone
                row = {
                    "figure": "peers_round",
                    "shape": f"{D}->{N}, batch {B}",
                    "arch": arch,
                    "round": r,
                    "load": _load(),
                    "gemm_peak_gflops": [round(before, 1), round(after, 1)],
                    "encoder_gemm_samples_s": round(floor),
                    "samples_s": {m: round(rate[m], 1) for m in entries[arch]},
                    "of_encoder_gemm": {m: round(rate[m] / floor, 3) for m in entries[arch]},
                    "ours_vs": {
                        p: round(rate[ours] / rate[p], 3)
                        for p, ours in PEERS[arch].items()
                        if p in rate
                    },
                    "dead": dead_seen,
                }
                if arch_of(arch) == "relu":  # what our ReLU step ran while it was timed
                    ours = entries[arch]["ours"]
                    row["ours_sparse_share"] = round(ours.sparse_share, 3)
                    row["ours_l0_after"] = round(ours.relu_l0(), 1)
                history[arch].append(row)
                yield row
        for arch in archs:
            yield _summary(arch, history[arch], na[arch])
    finally:
        if worker:
            worker.close()


def _median(rows: list[dict], key: str) -> dict[str, float]:
    names = rows[0][key]
    return {m: round(statistics.median(r[key][m] for r in rows), 3) for m in names}


def _summary(arch: str, rows: list[dict], na: dict[str, str]) -> dict:
    """Medians over the rounds, and the speed goals: met, not met, or None (not measured)."""
    rates = _median(rows, "samples_s")
    vs = _median(rows, "ours_vs") if rows[0]["ours_vs"] else {}
    of_gemm = _median(rows, "of_encoder_gemm")
    peers = [p for p in PEERS[arch] if p in rates]
    fastest = max(peers, key=rates.get) if peers else None
    out = {
        "figure": "peers_summary",
        "shape": rows[0]["shape"],
        "arch": arch,
        "rounds": len(rows),
        "load_1m": [min(r["load"][0] for r in rows), max(r["load"][0] for r in rows)],
        "gemm_peak_gflops": [
            min(min(r["gemm_peak_gflops"]) for r in rows),
            max(max(r["gemm_peak_gflops"]) for r in rows),
        ],
        "samples_s": {m: round(v) for m, v in rates.items()},
        "ours_vs": vs,
        "of_encoder_gemm": of_gemm,
        "fastest_peer": fastest,
        # ours' smallest lead: against every peer, each compared with ours in its own setting
        # (sparsify with AuxK may be slower than without, yet the harder one to beat)
        "weakest_vs": min(vs.items(), key=lambda kv: kv[1]) if vs else None,
        "goal_1_5x_fastest_peer": min(vs.values()) >= 1.5 if vs else None,
        "na": na,
    }
    if arch_of(arch) == "relu":
        s = next((v for p, v in vs.items() if p.startswith("saelens-standard")), None)
        out["goal_2x_saelens"] = None if s is None else s >= 2.0
        out["ours_sparse_share"] = statistics.median(r["ours_sparse_share"] for r in rows)
        out["ours_l0_after"] = [
            min(r["ours_l0_after"] for r in rows),
            max(r["ours_l0_after"] for r in rows),
        ]
    if arch in K_ARCHS:
        out["goal_within_2x_encoder_gemm"] = of_gemm["ours"] >= 0.5
    return out


def table(records: list[dict]) -> str:
    """The summaries as a Markdown table (samples/s; ours ÷ each peer; ours' encoder-GEMM
    fraction), for a human reading the run."""
    lines = ["| shape | arch | ours | peers (samples/s, ours ÷ peer) | of encoder GEMM | load |"]
    lines.append("|---|---|---|---|---|---|")
    for s in records:
        if s.get("figure") != "peers_summary":
            continue
        ours = " / ".join(f"{s['samples_s'][m]:,}" for m in OURS[s["arch"]])
        peers = (
            "; ".join(
                f"{p} {s['samples_s'][p]:,} ({s['ours_vs'][p]:.2f}x)"
                for p in PEERS[s["arch"]]
                if p in s["ours_vs"]
            )
            or "n/a"
        )
        lo, hi = s["load_1m"]
        lines.append(
            f"| {s['shape']} | {s['arch']} | {ours} | {peers} | {s['of_encoder_gemm']['ours']} "
            f"| {lo}-{hi} |"
        )
    return "\n".join(lines)


def run_bench(
    shapes: dict[str, tuple[int, int, int]],
    k: int,
    *,
    archs: list[str],
    rounds: int,
    target_s: float,
    exe: str | None,
    threads: int = THREADS,
):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, (B, D, N) in shapes.items():
            yield from run_shape(
                shape, B, D, N, k, archs=archs, rounds=rounds, target_s=target_s, exe=exe
            )
    finally:
        torch.set_num_threads(before)


def run():
    quick = os.environ.get("PEERS_QUICK") == "1"
    shapes = QUICK_SHAPES if quick else SHAPES
    if os.environ.get("PEERS_SHAPES"):
        shapes = {s: SHAPES[s] for s in os.environ["PEERS_SHAPES"].split(",")}
    archs = os.environ.get("PEERS_ARCHS", ",".join(OURS)).split(",")
    records = []
    for record in run_bench(
        shapes,
        QUICK_K if quick else K,
        archs=archs,
        rounds=int(os.environ.get("PEERS_ROUNDS", 1 if quick else 3)),
        target_s=float(os.environ.get("PEERS_TARGET_S", 0.3 if quick else 3.0)),
        exe=peers_python(),
        threads=int(os.environ.get("PEERS_THREADS", THREADS)),
    ):
        records.append(record)
        yield record
    print(table(records), file=sys.stderr, flush=True)


if __name__ == "__main__":
    for record in run():
        print(json.dumps(record), flush=True)
