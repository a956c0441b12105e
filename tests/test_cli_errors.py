"""Every user mistake ends with one line naming what to fix (exit 1), never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.cli import main, parse_overrides, UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "jobs" / "configs" / "ct_tiny.yaml")


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], expect: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"raypipe {argv[0]}: error:"), err
    assert "Traceback" not in err[0] and expect in err[0], err


def test_common_mistakes_name_what_to_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["train", "cnn-rnn", "--config", TINY, "--data", str(tmp_path / "nope")], "not found")
    _one_line_error(capsys, ["train", "cnn-rnn", "--config", TINY, "--data", str(empty)], "no preprocessed shards")
    _one_line_error(capsys, ["cv", "cnn-rnn", "--config", TINY, "--data", str(empty)], "no preprocessed shards")
    _one_line_error(capsys, ["train", "cnn-rnn", "--config", TINY, "--data", str(empty), "--set", "lr_typo=1"],
                    "lr_typo: unknown key")
    _one_line_error(capsys, ["train", "cnn-rnn", "--config", str(tmp_path / "missing.yaml"), "--data", str(empty)],
                    "config file not found")
    _one_line_error(capsys, ["train", "cnn-rnn", "--config", TINY, "--data", str(empty), "--set", "lr"],
                    "--set expects key=value")
    _one_line_error(capsys, ["validate", str(tmp_path / "manifest.csv")], "manifest not found")
    _one_line_error(capsys, ["preprocess", "ct", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")],
                    "--manifest not found")
    _one_line_error(capsys, ["evaluate", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "r")], "not found")
    _one_line_error(capsys, ["synth", "ct"], "--out is required")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id\n")
    _one_line_error(capsys, ["preprocess", "ct", "--manifest", str(manifest), "--out", str(tmp_path / "o"),
                             "--set", "n_slice=3"], "n_slice: unknown key")


def test_required_options_and_help_on_every_option(capsys: pytest.CaptureFixture) -> None:
    from raypipe.cli import build_parser

    with pytest.raises(SystemExit):
        main(["train", "cnn-rnn"])
    assert "--data" in capsys.readouterr().err
    import argparse

    def walk(parser: argparse.ArgumentParser) -> None:
        for opt in parser._actions:
            if opt.dest == "help":
                continue
            assert opt.help, f"{parser.prog}: {opt.dest} has no help"
            if isinstance(opt, argparse._SubParsersAction):
                for sub in opt.choices.values():
                    walk(sub)

    walk(build_parser())


def test_set_values_are_read_as_yaml() -> None:
    assert parse_overrides(["lr=1e-4", "model_kwargs.dropout=0.1", "clinical_columns=[age, sex]", "x="]) == {
        "lr": 1e-4, "model_kwargs.dropout": 0.1, "clinical_columns": ["age", "sex"], "x": None}
    with pytest.raises(UsageError):
        parse_overrides(["=3"])
