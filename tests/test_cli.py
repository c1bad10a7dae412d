import sys

import yaml
from typer.testing import CliRunner

from gmner.cli import app
from gmner.pipeline import STAGES

from helpers import REPO, cli_exit_code


def test_help_lists_every_dvc_stage_and_predict():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)  # the one stage table, and the pipeline, list the same stages
    for name in [*stages, "predict"]:
        assert f" {name} " in result.output, name
        assert name == "predict" or (REPO / "stages" / f"{name}.py").is_file()


def test_stage_commands_run_the_stage_modules_with_overrides(tmp_path, monkeypatch):
    calls = []
    fake = type("M", (), {"run_stage": staticmethod(lambda params: calls.append(params))})
    monkeypatch.setitem(sys.modules, STAGES["sample"].module, fake)
    (tmp_path / "p.yaml").write_text("sample: {train: 3}\n")
    result = CliRunner().invoke(app, ["sample", "--params", str(tmp_path / "p.yaml"), "--set", "sample.train=5"])
    assert result.exit_code == 0, result.output
    assert calls == [{"sample": {"train": 5}}]


def test_bad_input_ends_with_its_location_and_exit_code_2(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")  # the folder is checked first, its model after the input
    assert cli_exit_code(monkeypatch, "predict", str(tmp_path / "model"), str(bad), str(tmp_path / "o")) == 2
    assert f"error: {bad}:2:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exp_run_passes_a_config_files_params_as_overrides(tmp_path, monkeypatch, capsys):
    (tmp_path / "p.yaml").write_text("train: {lr: 0.1, encoder: tiny}\n")
    (tmp_path / "c.yaml").write_text("train: {lr: 3.0e-5, encoder: bert-base-cased}\n")
    args = ["exp-run", str(tmp_path / "c.yaml"), "--params", str(tmp_path / "p.yaml"), "--dry-run"]
    result = CliRunner().invoke(app, [*args, "train", "--queue"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "dvc exp run -S train.lr=3.0e-05 -S train.encoder=bert-base-cased train --queue"
    (tmp_path / "c.yaml").write_text("train: {lr_typo: 1}\n")
    assert cli_exit_code(monkeypatch, *args) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'c.yaml'}: train.lr_typo: unknown param; known: ")
