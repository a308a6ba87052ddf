import json

from unsuperpose.cli import main


def test_train_through_the_cli(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "m"
    code = main(
        [
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
    )
    assert code == 0 and (out / "model.safetensors").is_file()
    assert "validation loss" in capsys.readouterr().out
    main(["lm", "info", str(out)])
    info = json.loads(capsys.readouterr().out)
    assert (info["d_model"], info["n_ctx"], info["corpus"]["corpus"]) == (8, 16, tiny_corpus.corpus)
    assert info["extra"]["train"]["tokens"] == 256


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
    assert "is not 'wiki', 'gensim', an existing file" in capsys.readouterr().err
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
