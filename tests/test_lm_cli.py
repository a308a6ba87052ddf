import json

from unsuperpose.cli import main


def test_train_through_the_cli(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "m"
    argv = [
        "lm",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--n-layer",
        "1",
        "--d-model",
        "8",
        "--n-head",
        "2",
        "--d-mlp",
        "16",
        "--n-ctx",
        "16",
        "--tokens",
        "256",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--corpus",
        tiny_corpus.corpus,
        "--val-fraction",
        "0.2",
        "--token-cache",
        str(tmp_path / "cache"),
        "--threads",
        "1",
        "--wandb",
        "disabled",
        "--no-progress",
    ]
    code = main(argv)
    assert code == 0 and (out / "model.safetensors").is_file()
    assert "validation loss" in capsys.readouterr().out
    main(["lm", "info", str(out)])
    info = json.loads(capsys.readouterr().out)
    assert (info["d_model"], info["n_ctx"], info["corpus"]["corpus"]) == (8, 16, tiny_corpus.corpus)
    assert info["extra"]["train"]["tokens"] == 256
    assert main(argv) == 2  # a finished model is not trained over without --force
    err = capsys.readouterr().err
    assert "already holds a trained model; train it again with --force, or into another " in err
    assert err.rstrip().endswith("(--out)") and "overwrite=True" not in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["lm", "train", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["lm", "adopt", "--from", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert (
        main(
            ["lm", "train", "--out", str(tmp_path / "z"), "--corpus", str(tmp_path / "none.jsonl")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        f"error: --corpus {tmp_path / 'none.jsonl'} is not 'wiki', 'gensim', an existing file"
        in err
    )
    # The stages' settings, named as the flags that set them.
    assert main(["lm", "train", "--out", str(tmp_path / "z"), "--n-head", "3"]) == 2
    assert "error: --n-head 3 must divide --d-model 16" in capsys.readouterr().err
    args = ["--out", str(tmp_path / "z"), "--micro-batch", "3", "--batch-size", "8"]
    assert main(["lm", "train", *args]) == 2
    assert "error: --micro-batch 3 must divide --batch-size 8" in capsys.readouterr().err
    assert main(["lm", "tokens", "--corpus", "wiki", "--val-fraction", "1.5"]) == 2
    assert "error: --val-fraction 1.5: must be in [0, 1)" in capsys.readouterr().err
    (tmp_path / "titles.jsonl").write_text(json.dumps({"title": "x"}) + "\n")
    assert main(["lm", "tokens", "--corpus", str(tmp_path / "titles.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "no field 'text'" in err and "with --text-field NAME" in err
    assert "Traceback" not in err
    assert (
        not (tmp_path / "x").exists()
        and not (tmp_path / "y").exists()
        and not (tmp_path / "z").exists()
    )


def test_tokens_reports_splits_and_unigram_entropy(tmp_path, tiny_corpus, capsys):
    assert (
        main(
            [
                "lm",
                "tokens",
                "--corpus",
                tiny_corpus.corpus,
                "--val-fraction",
                "0.2",
                "--n-ctx",
                "8",
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (
        report["train"]["n_documents"] + report["val"]["n_documents"]
        == report["all"]["n_documents"]
        == 40
    )
    assert 0 < report["unigram_entropy"] < 10.83  # below log(50257): the text is far from uniform


def test_training_on_from_a_model_names_the_flags_its_architecture_needs(
    tmp_path, tiny_corpus, tiny_lm_dir, capsys
):
    argv = ["lm", "train", "--from", str(tiny_lm_dir), "--out", str(tmp_path / "ft")]
    argv += ["--n-layer", "1", "--corpus", tiny_corpus.corpus, "--wandb", "disabled"]
    argv += ["--token-cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "its architecture differs from the one asked for (it has --n-layer 3, not 1)" in err
    assert "Traceback" not in err
