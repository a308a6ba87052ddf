"""LLM-judged interpretability against a deterministic chat endpoint started here on 127.0.0.1.

The store is planted: unit j (neuron j, and latent j of an identity SAE) is active exactly on
the word WORDS[j], so the truth is known without our code. A judge that reads the truth off the
excerpts (the word the marks point at) must score 1 on detection and fuzzing; one that names
excerpts at random must score about 0.5, the chance level the protocol is built for.
"""

from __future__ import annotations

import json
import random
import re
import socket
from collections import Counter
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch

from local_http import LocalServer
from test_analyze_browser import N_CTX, write_store
from unsuperpose.analyze.autointerp import AutointerpSettings, parse_numbers
from unsuperpose.analyze.features import build_browser
from unsuperpose.cli import main
from unsuperpose.harvest import ActivationStore
from unsuperpose.lm import get_tokenizer
from unsuperpose.train import SAE

TOK = get_tokenizer()
WORDS = [" cat", " dog", " owl", " fox", " river", " tree", " house", " bird"]
FILLER = [" the", " a", " of", " and", " to", " in", " is", " it", " on", " at", " by", " as"]
PLANTED = [TOK.encode(w)[0] for w in WORDS]
FILL = [TOK.encode(w)[0] for w in FILLER]
ROWS = 6000


class Judge(LocalServer):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1; ``answer(system, lines)`` decides.
    Every request is kept (body and headers) for the tests to read."""

    def __init__(self, answer, key: str | None = None):
        self.answer, self.key, self.requests = answer, key, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(
                    {"path": self.path, "body": body, "headers": dict(self.headers)}
                )
                if (
                    judge.key is not None
                    and self.headers.get("Authorization") != f"Bearer {judge.key}"
                ):
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(b'{"error": "bad key"}')
                    return
                system, user = (m["content"] for m in body["messages"])
                lines = [m.group(2) for m in re.finditer(r"^(\d+)\. (.*)$", user, re.M)]
                text = judge.answer(system, lines)
                reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def oracle(system: str, lines: list[str]) -> str:
    """The truth, read off the excerpts: explain by the most marked word; then name the excerpts
    holding that word (detection) or whose mark is on it (fuzzing)."""
    if "explained as" not in system:
        marked = Counter(w.strip() for line in lines for w in re.findall(r"<<(.*?)>>", line))
        return f"the word '{marked.most_common(1)[0][0]}'"
    word = re.search(r"the word '(\w+)'", system).group(1)
    if "marked" in system:
        hits = [re.search(r"<<(.*?)>>", line).group(1).strip() == word for line in lines]
    else:
        hits = [re.search(rf"(?<!\w){word}(?!\w)", line) is not None for line in lines]
    return json.dumps([i + 1 for i, hit in enumerate(hits) if hit])


def coin_flipper(seed: int):
    rng = random.Random(seed)

    def answer(system: str, lines: list[str]) -> str:
        if "explained as" not in system:
            return "something"
        return json.dumps([i + 1 for i in range(len(lines)) if rng.random() < 0.5])

    return answer


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Tokens: a filler word, or (1 row in 12) one of the planted words; coordinate j is 3 on
    WORDS[j] and -0.1 elsewhere, so neuron j fires exactly there. The SAE reads coordinate j
    into latent j (identity encoder, ReLU)."""
    tmp = tmp_path_factory.mktemp("autointerp")
    rng = np.random.default_rng(0)
    planted_row = rng.random(ROWS) < 1 / 12
    tokens = np.where(planted_row, rng.choice(PLANTED, ROWS), rng.choice(FILL, ROWS))
    acts = np.full((ROWS, len(WORDS)), -0.1, np.float32)
    for j, t in enumerate(PLANTED):
        acts[tokens == t, j] = 3.0
    path = write_store(tmp / "layer1.zarr", acts, tokens, np.arange(ROWS) % N_CTX)
    d = len(WORDS)
    sae = SAE(d, d, params={"W_enc": torch.eye(d), "b_enc": torch.zeros(d), "W_dec": torch.eye(d)})
    sae_dir = sae.save(
        tmp / "saes" / "relu-n8-l1_0.001",
        {"l1": 1e-3, "source": {"kind": "activation_store", "path": str(path)}},
    )
    return tmp, path, sae_dir


def _browse(planted, out, judge_url: str, model: str, **kw):
    _, path, sae_dir = planted
    settings = AutointerpSettings(endpoint=judge_url, model=model, units=8, **kw)
    return build_browser(
        [sae_dir],
        ActivationStore(path),
        out,
        TOK.decode,
        progress=False,
        autointerp=settings,
    )


def test_a_judge_that_reads_the_truth_scores_one_and_one_that_guesses_scores_chance(
    planted, tmp_path
):
    with Judge(oracle) as judge:
        _browse(planted, tmp_path / "oracle", judge.url, "oracle-7b")
    summary = json.loads((tmp_path / "oracle" / "autointerp" / "summary.json").read_text())
    assert summary["model"] == "oracle-7b" and summary["chance"] == 0.5
    for name in ("relu-n8-l1_0.001", "neurons"):
        page = summary["dictionaries"][name]
        assert page["units_judged"] == 8 and page["parse_failures"] == 0
        assert page["detection"]["mean"] == 1.0 and page["fuzzing"]["mean"] == 1.0
        for unit, j in page["judged"].items():
            assert j["explanation"] == f"the word '{WORDS[int(unit)].strip()}'"
    # 3 requests per unit, each the model named, deterministic, to <base>/chat/completions
    assert len(judge.requests) == summary["calls"] == 2 * 8 * 3
    assert {r["path"] for r in judge.requests} == {"/v1/chat/completions"}
    assert {(r["body"]["model"], r["body"]["temperature"]) for r in judge.requests} == {
        ("oracle-7b", 0)
    }
    # every prompt and raw answer is kept, with the labels the scores were computed from
    units = [json.loads(line) for line in open(tmp_path / "oracle/autointerp/neurons.jsonl")]
    calls = units[0]["calls"]
    assert [c["task"] for c in calls] == ["explain", "detection", "fuzzing"]
    det = calls[1]
    assert len(det["labels"]) == 12 and sum(det["labels"]) == 6  # 6 active, 6 silent
    assert det["answer"] == json.dumps(det["named"])
    assert "<<" not in det["messages"][1]["content"]  # detection shows no marks
    fuzz = calls[2]
    assert len(fuzz["labels"]) == 6 and sum(fuzz["labels"]) == 3
    index = (tmp_path / "oracle" / "index.html").read_text()
    assert "LLM-judged interpretability" in index and "oracle-7b" in index
    assert "the word &#x27;owl&#x27;" in (tmp_path / "oracle" / "neurons.html").read_text()

    with Judge(coin_flipper(0)) as judge:
        _browse(planted, tmp_path / "coin", judge.url, "coin")
    summary = json.loads((tmp_path / "coin" / "autointerp" / "summary.json").read_text())
    scores = [
        page[task]["mean"]
        for page in summary["dictionaries"].values()
        for task in ("detection", "fuzzing")
    ]
    # 2 pages x 8 units x (12 + 6) excerpts = 288 guesses: SE of the pooled mean ~0.03
    assert abs(np.mean(scores) - 0.5) < 0.1, scores
    assert all(0.25 < s < 0.75 for s in scores), scores


def test_answers_are_read_from_their_first_list_and_anything_else_names_none():
    assert parse_numbers("[2, 5]", 6) == {2, 5}
    assert parse_numbers("Active in: [1,3] (and maybe [4])", 6) == {1, 3}
    assert parse_numbers("[0, 7, 2]", 6) == {2}  # numbers outside 1..n are dropped
    assert parse_numbers("[]", 6) == set()
    assert parse_numbers("excerpts 1 and 2", 6) is None


def test_the_cli_judges_only_when_asked_and_sends_the_key_from_the_environment(
    planted, tmp_path, capsys, monkeypatch
):
    _, path, sae_dir = planted
    base = [
        "analyze",
        "features",
        "--dictionary",
        str(sae_dir),
        "--store",
        str(path),
        "--no-progress",
    ]
    with Judge(oracle, key="sk-test") as judge:
        assert main([*base, "--out", str(tmp_path / "plain")]) == 0
        assert not (tmp_path / "plain" / "autointerp").exists() and judge.requests == []

        ask = [
            "--autointerp-endpoint",
            judge.url,
            "--autointerp-model",
            "m",
            "--autointerp-units",
            "2",
        ]
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        assert main([*base, "--out", str(tmp_path / "nokey"), *ask]) == 2
        assert (
            "refused the request (401): set the API key in $OPENAI_API_KEY"
            in capsys.readouterr().err
        )

        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        out = tmp_path / "judged"
        assert main([*base, "--out", str(out), *ask, "--autointerp-key-env", "JUDGE_KEY"]) == 0
        summary = json.loads((out / "autointerp" / "summary.json").read_text())
        assert summary["dictionaries"]["neurons"]["units_judged"] == 2
        assert "sk-test" not in (out / "autointerp" / "neurons.jsonl").read_text()

    assert main([*base, "--out", str(tmp_path / "x"), "--autointerp-endpoint", judge.url]) == 2
    err = capsys.readouterr().err
    assert f"--autointerp-endpoint {judge.url} needs --autointerp-model NAME" in err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = ["--autointerp-endpoint", f"http://127.0.0.1:{port}/v1", "--autointerp-model", "m"]
    assert main([*base, "--out", str(tmp_path / "y"), *gone, "--autointerp-units", "1"]) == 2
    assert f"cannot reach http://127.0.0.1:{port}/v1/chat/completions" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "z"), *ask, "--autointerp-units", "0"]) == 2
    assert "--autointerp-units 0: must be at least 1" in capsys.readouterr().err
