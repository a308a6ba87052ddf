"""LLM-judged interpretability of a dictionary's units, and of the neurons beside them.

A chat model (any OpenAI-compatible endpoint, ``analyze.endpoint``) writes an explanation of each
unit from its top excerpts, and the explanation is scored by how well it lets the model tell
the unit's activity apart: Bills et al. (2023)'s explain-then-predict idea, in the classification
form of delphi (Paulo et al. 2024) and SAEBench's autointerp, which need no calibrated
activation predictions. The protocol was fixed before any score was read:

- Units: a seeded random choice of ``units`` among those that fired on at least
  ``explain + score`` of the scanned rows; the same rule for every dictionary and the neurons.
- Explanation: the unit's ``explain`` strongest rows, each as an excerpt of up to ``left`` tokens
  before it and ``right`` after, within its context block; every token where the unit is > 0
  is marked <<like this>>.
- Detection: ``score`` excerpts centred on rows drawn uniformly from the unit's other firing rows
  (its top rows excluded), and ``score`` excerpts on which the unit is <= 0 at every token,
  shuffled. The model names the excerpts where the unit is active; the score is the fraction
  classified right. Half are active, so any way of guessing scores 0.5 in expectation.
- Fuzzing: the same active excerpts with one token marked: in half of them (rounded up) the
  token where the unit is strongest, in the rest a token where it is <= 0 (an excerpt with no
  such token keeps the right mark, and its label says so). The model names the excerpts marked
  right; the score is the fraction classified right (chance 0.5).
- An answer without a list of numbers counts as naming none; such answers are counted.
- Per dictionary: the mean score over its units ± the standard error of that mean.

Every prompt, the model's name and every raw answer are written beside the scores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unsuperpose.analyze.browser import UnitStats, gather, span_rows, spans, token_arrays
from unsuperpose.analyze.endpoint import ChatEndpoint
from unsuperpose.config import write_json_atomic, write_text_atomic
from unsuperpose.harvest import bf16_to_torch

Encoder = Callable[[torch.Tensor], torch.Tensor]
CHANCE = 0.5

EXPLAIN = (
    "You are interpreting one unit of a neural network that reads text. Below are excerpts of "
    "text on which the unit is active; the tokens where it is active are marked <<like this>>. "
    "Say in one short phrase what the unit responds to (a word, a kind of word, a pattern in the "
    "text). Answer with the phrase only."
)
DETECT = (
    "A unit of a neural network that reads text has been explained as: {explanation}\n"
    "Below are numbered excerpts of text. In some of them the unit is active on at least one "
    "token; in the others it is active on none. Answer with a JSON list of the numbers of the "
    "excerpts in which you expect it to be active, for example [2, 5], or [] for none, and "
    "nothing else."
)
FUZZ = (
    "A unit of a neural network that reads text has been explained as: {explanation}\n"
    "Below are numbered excerpts of text, each with one token marked <<like this>>. Answer with "
    "a JSON list of the numbers of the excerpts whose marked token is one on which you expect "
    "the unit to be active, for example [1, 3], or [] for none, and nothing else."
)


class AutointerpError(ValueError):
    """Settings autointerp cannot run with."""


@dataclass(frozen=True)
class AutointerpSettings:
    endpoint: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    units: int = 20
    explain: int = 10
    score: int = 6
    left: int = 24
    right: int = 8
    seed: int = 0
    max_tokens: int = 200

    def check(self) -> None:
        for name in ("units", "explain", "score"):
            if getattr(self, name) < 1:
                raise AutointerpError(f"{name}={getattr(self, name)}: must be at least 1")


@dataclass
class Excerpt:
    row: int  # the store row it is centred on
    tokens: list[int]
    acts: list[float]  # the unit's activation at each token

    @property
    def active(self) -> bool:
        return max(self.acts, default=0.0) > 0


@dataclass
class UnitResult:
    unit: int
    explanation: str
    detection: float
    fuzzing: float
    parse_failures: int
    calls: list[dict] = field(default_factory=list)


# -- which rows: top rows from the browser's scan, random firing and quiet rows from one pass ----


def eligible_units(stats: UnitStats, s: AutointerpSettings) -> tuple[np.ndarray, int]:
    """(the units to judge, sorted; how many were eligible)."""
    ok = np.flatnonzero(stats.count >= s.explain + s.score)
    rng = np.random.default_rng(s.seed)
    chosen = rng.choice(ok, size=min(s.units, len(ok)), replace=False) if len(ok) else ok
    return np.sort(chosen), len(ok)


def sample_rows(
    store,
    encoders: dict[str, Encoder],
    units: dict[str, np.ndarray],
    *,
    rows: int,
    n_fire: int,
    n_quiet: int,
    seed: int,
    batch_rows: int = 4096,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per encoder, for each of its ``units``: ``n_fire`` rows drawn uniformly from those where
    it is > 0 and ``n_quiet`` from those where it is <= 0 (-1 where there are fewer), from the
    first ``rows`` rows. Each (row, unit) gets a seeded random priority and the highest are kept,
    so one streaming pass draws without replacement."""
    keep: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(
        total=rows, unit="row", unit_scale=True, desc="autointerp rows", disable=not progress
    )
    with torch.inference_mode():
        for lo in range(0, rows, batch_rows):
            hi = min(rows, lo + batch_rows)
            x = bf16_to_torch(store.read_rows(lo, hi)).float().to(device)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + lo)
            idx = torch.arange(lo, hi).unsqueeze(1)
            for name, enc in encoders.items():
                u = torch.as_tensor(units[name], dtype=torch.long)
                if not len(u):
                    continue
                a = enc(x)[:, u.to(x.device)].cpu()
                prio = torch.rand(a.shape, generator=gen)
                best = keep.get(name)
                merged = []
                for j, (mask, n) in enumerate(((a > 0, n_fire), (a <= 0, n_quiet))):
                    p = torch.where(mask, prio, torch.full_like(prio, -1.0))
                    r = idx.expand_as(p)
                    if best is not None:
                        p = torch.cat([best[2 * j], p])
                        r = torch.cat([best[2 * j + 1], r])
                    top_p, pick = p.topk(min(n, len(p)), dim=0)
                    merged += [top_p, r.gather(0, pick)]
                keep[name] = merged
            bar.update(hi - lo)
    bar.close()
    out = {}
    for name, (pf, rf, pq, rq) in keep.items():
        fire = torch.where(pf >= 0, rf, torch.full_like(rf, -1)).T.numpy()
        quiet = torch.where(pq >= 0, rq, torch.full_like(rq, -1)).T.numpy()
        out[name] = (fire, quiet)
    return out


def read_rows_at(store, wanted: np.ndarray, step: int = 8192) -> np.ndarray:
    """Store rows ``wanted`` (sorted, unique) as float32, reading only the blocks that hold them."""
    out = np.empty((len(wanted), store.d), np.float32)
    for lo in range(0, int(wanted[-1]) + 1 if len(wanted) else 0, step):
        a, b = np.searchsorted(wanted, [lo, lo + step])
        if a < b:
            block = store.read_rows(lo, min(lo + step, store.rows))
            out[a:b] = bf16_to_torch(block[wanted[a:b] - lo]).float().numpy()
    return out


def make_excerpts(
    store,
    encoder: Encoder,
    wanted: list[tuple[int, int]],
    *,
    left: int,
    right: int,
    device: torch.device | str = "cpu",
    batch_rows: int = 4096,
) -> list[Excerpt]:
    """An excerpt per (unit, row) pair: the tokens around the row and the unit's activation at
    each of them (the dictionary run on the excerpt's rows of the store)."""
    if not wanted:
        return []
    centre = np.unique(np.array([r for _, r in wanted], np.int64))
    lo, hi = spans(store.path, centre, left=left, right=right)
    rows = span_rows(lo, hi)
    tokens, _ = token_arrays(store.path)
    tok = gather(tokens, rows, 1 << 16)
    units = sorted({u for u, _ in wanted})
    column = {u: i for i, u in enumerate(units)}
    x_all = read_rows_at(store, rows)
    acts = np.empty((len(rows), len(units)), np.float32)
    pick = torch.tensor(units, dtype=torch.long, device=device)
    with torch.inference_mode():
        # In batches, keeping only the judged units: a wide dictionary's full codes for every
        # excerpt row would not fit.
        for a in range(0, len(rows), batch_rows):
            x = torch.from_numpy(x_all[a : a + batch_rows]).to(device)
            acts[a : a + len(x)] = encoder(x)[:, pick].float().cpu().numpy()
    out = []
    for unit, r in wanted:
        i = int(np.searchsorted(centre, r))
        a, b = np.searchsorted(rows, [lo[i], hi[i] + 1])
        out.append(
            Excerpt(
                row=int(r),
                tokens=[int(t) for t in tok[a:b]],
                acts=[float(v) for v in acts[a:b, column[unit]]],
            )
        )
    return out


# -- prompts and answers ---------------------------------------------------------------------


def render(ex: Excerpt, marks: set[int], piece: Callable[[int], str]) -> str:
    """One excerpt on one line, the tokens at ``marks`` between << and >>."""
    parts = []
    for i, t in enumerate(ex.tokens):
        text = piece(t).replace("\r", "").replace("\n", "\u21b5").replace("\t", " ")
        parts.append(f"<<{text}>>" if i in marks else text)
    return "".join(parts)


def numbered(lines: list[str]) -> str:
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def parse_numbers(answer: str, n: int) -> set[int] | None:
    """The 1-based numbers in the answer's first [...] list, within 1..n (None: no list)."""
    m = re.search(r"\[([^\[\]]*)\]", answer)
    if m is None:
        return None
    return {int(v) for v in re.findall(r"\d+", m.group(1)) if 1 <= int(v) <= n}


def judge_unit(
    unit: int,
    top: list[Excerpt],
    active: list[Excerpt],
    quiet: list[Excerpt],
    chat: ChatEndpoint,
    piece: Callable[[int], str],
    rng: np.random.Generator,
) -> UnitResult:
    """Explain ``unit`` from ``top``, then score the explanation on ``active`` + ``quiet``."""
    calls: list[dict] = []

    def ask(task: str, system: str, lines: list[str], labels: list[bool] | None = None):
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": numbered(lines)},
        ]
        answer = chat.complete(messages)
        call = {"task": task, "messages": messages, "answer": answer}
        if labels is not None:
            got = parse_numbers(answer, len(lines))
            call["labels"] = [int(v) for v in labels]
            call["named"] = sorted(got) if got is not None else None
        calls.append(call)
        return answer, call

    explanation, _ = ask(
        "explain",
        EXPLAIN,
        [render(ex, {i for i, a in enumerate(ex.acts) if a > 0}, piece) for ex in top],
    )
    explanation = " ".join(explanation.split())[:500] or "(no explanation)"

    mixed = [(ex, True) for ex in active] + [(ex, False) for ex in quiet]
    order = rng.permutation(len(mixed))
    shown = [mixed[i] for i in order]
    _, det = ask(
        "detection",
        DETECT.format(explanation=explanation),
        [render(ex, set(), piece) for ex, _ in shown],
        [lab for _, lab in shown],
    )

    right_marks = -(-len(active) // 2)
    fuzz_lines, fuzz_labels = [], []
    for j in rng.permutation(len(active)):
        ex = active[int(j)]
        peak = int(np.argmax(ex.acts))
        off = [i for i, a in enumerate(ex.acts) if a <= 0]
        if len(fuzz_lines) < right_marks or not off:
            mark, label = peak, True
        else:
            mark, label = int(rng.choice(off)), False
        fuzz_lines.append(render(ex, {mark}, piece))
        fuzz_labels.append(label)
    order = rng.permutation(len(fuzz_lines))
    _, fuz = ask(
        "fuzzing",
        FUZZ.format(explanation=explanation),
        [fuzz_lines[i] for i in order],
        [fuzz_labels[i] for i in order],
    )
    return UnitResult(
        unit=unit,
        explanation=explanation,
        detection=accuracy(det),
        fuzzing=accuracy(fuz),
        parse_failures=sum(c.get("named", []) is None for c in (det, fuz)),
        calls=calls,
    )


def accuracy(call: dict) -> float:
    """The fraction of excerpts classified right; an unparseable answer named none."""
    named = set(call["named"] or [])
    labels = call["labels"]
    return sum((i + 1 in named) == bool(lab) for i, lab in enumerate(labels)) / len(labels)


def mean_se(values: list[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": mean, "se": se, "n": n}


# -- the whole pass --------------------------------------------------------------------------


def run_autointerp(
    store,
    encoders: dict[str, Encoder],
    stats: dict[str, UnitStats],
    decode: Callable[[list[int]], str],
    out: str | Path,
    settings: AutointerpSettings,
    *,
    chat: ChatEndpoint | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Judge ``settings.units`` units of every encoder (named as in ``stats``, the browser's scan)
    and write ``out/<name>.jsonl`` (a unit per line: explanation, scores, prompts and raw answers)
    and ``out/summary.json``; returns the summary."""
    settings.check()
    chat = chat or ChatEndpoint(
        settings.endpoint,
        settings.model,
        key_env=settings.key_env,
        max_tokens=settings.max_tokens,
    )
    out = Path(out)
    rows = next(iter(stats.values())).rows
    chosen = {name: eligible_units(st, settings) for name, st in stats.items()}
    units = {name: c[0] for name, c in chosen.items()}
    drawn = sample_rows(
        store,
        encoders,
        units,
        rows=rows,
        n_fire=settings.explain + settings.score,
        n_quiet=4 * settings.score,
        seed=settings.seed,
        device=device,
        progress=progress,
    )
    piece_cache: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in piece_cache:
            piece_cache[t] = decode([t])
        return piece_cache[t]

    summary = {
        "model": settings.model,
        "endpoint": chat.url,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("endpoint", "model")},
        "store": str(store.path),
        "rows_scanned": rows,
        "chance": CHANCE,
        "dictionaries": {},
    }
    bar = tqdm(
        total=sum(len(u) for u in units.values()),
        desc="autointerp units",
        disable=not progress,
    )
    for name, st in stats.items():
        mine, eligible = chosen[name]
        fire, quiet = drawn.get(name, (np.zeros((0, 0), int), np.zeros((0, 0), int)))
        rng = np.random.default_rng(settings.seed)
        wanted: list[tuple[int, int]] = []
        plan = []
        for j, u in enumerate(mine):
            top = [int(r) for r, v in zip(st.top_rows[u], st.top_vals[u]) if v > 0]
            top = top[: settings.explain]
            shown = set(top)
            others = [int(r) for r in fire[j] if r >= 0 and int(r) not in shown]
            others = others[: settings.score]
            calm = [int(r) for r in quiet[j] if r >= 0]
            plan.append((int(u), top, others, calm))
            wanted += [(int(u), r) for r in top + others + calm]
        excerpts = make_excerpts(
            store,
            encoders[name],
            wanted,
            left=settings.left,
            right=settings.right,
            device=device,
        )
        by_pair = {(u, ex.row): ex for (u, _), ex in zip(wanted, excerpts)}
        results, skipped = [], []
        for u, top, others, calm in plan:
            act = [by_pair[(u, r)] for r in others]
            act = [ex for ex in act if ex.active]
            still = [by_pair[(u, r)] for r in calm]
            still = [ex for ex in still if not ex.active]
            n = min(len(act), len(still), settings.score)
            bar.update(1)
            if n == 0:  # it fires on every excerpt drawn, or on none of its other rows
                skipped.append(u)
                continue
            result = judge_unit(
                u,
                [by_pair[(u, r)] for r in top],
                act[:n],
                still[:n],
                chat,
                piece,
                rng,
            )
            results.append(result)
        lines = "".join(json.dumps(asdict(r)) + "\n" for r in results)
        write_text_atomic(out / f"{name}.jsonl", lines)
        summary["dictionaries"][name] = {
            "units_judged": len(results),
            "units_eligible": eligible,
            "units_without_excerpts": skipped,
            "units": st.units,
            "detection": mean_se([r.detection for r in results]),
            "fuzzing": mean_se([r.fuzzing for r in results]),
            "parse_failures": sum(r.parse_failures for r in results),
            "judged": {
                str(r.unit): {
                    "explanation": r.explanation,
                    "detection": r.detection,
                    "fuzzing": r.fuzzing,
                }
                for r in results
            },
        }
    bar.close()
    summary["calls"] = chat.calls
    write_json_atomic(out / "summary.json", summary)
    return summary
