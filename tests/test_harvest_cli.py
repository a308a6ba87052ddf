"""`unsuperpose harvest` end to end on the shared tiny model and corpus (tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unsuperpose.cli import main
from unsuperpose.harvest import ActivationStore
from unsuperpose.lm import model_info, token_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_harvest_command_writes_stores_of_the_models_corpus(
    tiny_lm_dir, tiny_corpus, tmp_path, capsys
):
    out = tmp_path / "acts"
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(tiny_lm_dir),
                "--layer",
                "1,2",
                "--out",
                str(out),
                "--tokens",
                "300",
                "--chunk-rows",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "GiB of disk needed" in printed and "wrote" in printed
    info = model_info(tiny_lm_dir)
    blocks = token_blocks(tiny_corpus, info["n_ctx"], split="all")
    for layer in (1, 2):
        s = ActivationStore(out / f"layer{layer}.zarr")
        assert s.rows == 300 and s.d == 64
        assert s.metadata["weights_sha256"] == info["weights_sha256"]
        assert s.metadata["corpus_fingerprint"] == blocks.fingerprint
        assert (
            s.metadata["model_dir"] == info["path"]
            and s.metadata["corpus"]["corpus"] == tiny_corpus.corpus
        )
        np.testing.assert_array_equal(s.tokens(), np.asarray(blocks.blocks).reshape(-1)[:300])
    saved = json.loads((out / "layer1.zarr" / "harvest_config.json").read_text())
    assert saved["layer"] == "1,2" and saved["tokens"] == 300


def test_harvest_command_reports_bad_input_without_a_traceback(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "acts"
    assert main(["harvest", "--lm", str(tiny_lm_dir), "--layer", "7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --layer 7: this model has layers 0..2" in err and "Traceback" not in err
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(tiny_lm_dir),
                "--hook",
                "blocks.{layer}.mlp.hook_postt",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "no hook point 'blocks.1.mlp.hook_postt'" in capsys.readouterr().err
