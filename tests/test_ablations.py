import hashlib
import itertools
import json
import sys
from datetime import datetime, timedelta

import pytest
from typer.testing import CliRunner

from gmner.cli import app
from gmner.core.errors import DataError
from gmner.evaluation import ablations
from gmner.evaluation.ablations import parse_exp_show, write_ablations

from helpers import cli_exit_code

DEFAULTS = {"top_k": 16, "regions": True, "global_feature": True, "loss": "kl", "captions": False}
MINUTES = itertools.count()  # revisions made later are newer


def revision(rev, name, seed, gmner=None, tagger=None, error=None, **grounded):
    """One revision as `dvc exp show --json` (DVC 3.67) writes it: params and metrics nested per file under
    "data"; a metrics file the revision lacks has an "error" instead."""
    metrics = {}
    if gmner is not None:
        metrics["metrics/grounded.json"] = {
            "data": {
                "dev": {"gmner": {"candidates": {"f1": gmner + 1}}, "mner": {"f1": 78.5}},
                "test": {"gmner": {"candidates": {"f1": gmner}}, "mner": {"f1": 74.2}},
            }
        }
    if tagger is None:
        metrics["metrics/tagger.json"] = {"error": {"type": "FileNotFoundError", "msg": "No such file"}}
    else:
        metrics["metrics/tagger.json"] = {"data": {"test": {"mner": {"f1": tagger}}}}
    params = {
        "base": {"seed": seed, "device": "cpu"},
        "train": {"lr": grounded.pop("lr", 0.001)},
        "train_grounded": {**DEFAULTS, **grounded},
    }
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "timestamp": None if rev == "workspace"
            else (datetime(2026, 11, 23) + timedelta(minutes=next(MINUTES))).isoformat(),
            "params": {"params.yaml": {"data": params}},
            "metrics": metrics,
            "deps": {"stages/train_grounded.py": {"hash": "33923d21f19264ef38e36fc79e884217", "size": 310}},
            "outs": {},
            "meta": {},
        },
        "error": error,
        "experiments": None,
    }


def experiment(name, seed, gmner=None, state=None, **kwargs):
    rev = revision(hashlib.sha1(name.encode()).hexdigest(), name, seed, gmner, **kwargs)
    executor = None if state is None else {"state": state, "name": "dvc-task", "local": {"returncode": 0}}
    return {"revs": [rev], "executor": executor, "name": name}


@pytest.fixture
def exp_show():
    head = revision("00e51ee53ed978a969b43bdd587fd3524c00c454", "main", 13, 58.9, tagger=70.0)
    head["experiments"] = [
        experiment("full-14-old", 14, 99.0),  # superseded by the re-run below
        experiment("full-15", 15, 57.3, tagger=72.0, lr=0.0003),
        experiment("regions-13", 13, 37.1, regions=False),
        experiment("regions-14", 14, 40.2, regions=False),
        experiment("regions-15", 15, 39.9, regions=False),
        experiment("ce-13", 13, 58.0, loss="ce"),
        experiment("grid-13", 13, 36.0, regions=False, loss="ce"),  # two ablations at once: no row
        experiment("full-14", 14, 56.2),
        experiment("crashed", 16, 58.9, state="failed", error={"msg": "Experiment run failed", "type": ""}),
        {"revs": [{**revision("a0ac0288" * 5, "waiting", 17), "data": None}], "executor": {"state": "queued"}},
    ]
    # After a plain `dvc exp run`, the workspace holds that experiment's params, not the defaults.
    return [revision("workspace", None, 15, 39.9, regions=False), head]


def rows(markdown):
    """Row name -> its cells, from the first table of the Markdown."""
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table)}


def test_cells_are_mean_and_sample_std_over_seeds(exp_show, tmp_path):
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(exp_show, indent=4))
    markdown = write_ablations(path, ["grounding"], out=tmp_path / "ablations.md")
    assert (tmp_path / "ablations.md").read_text() == markdown
    table = rows(markdown)
    # columns: seeds, test GMNER F1, test MNER F1, test EEG F1 (absent here), dev GMNER F1
    assert table["full"] == ["13, 14", "57.55 ± 1.91 (n=2)", "74.20 ± 0.00 (n=2)", "—", "58.55 ± 1.91 (n=2)"]
    assert table["regions off"][:2] == ["13, 14, 15", "39.07 ± 1.71 (n=3)"]
    assert table["CE instead of KL"][:2] == ["13", "58.00 (n=1)"]
    for empty in ["global feature off", "captions on", "generated image on", "top_k 4"]:
        assert table[empty] == ["—"] * 5
    # full-15 changed the learning rate as well: it is no full-model run, whatever the table ablates.
    assert ("Matching no row: full-15 (train.lr=0.0003); grid-13 (train_grounded.loss=\"ce\", "
            "train_grounded.regions=false).") in markdown
    assert "full: seed 14 has 2 experiments (full-14-old, full-14); the newest, full-14, is used." in markdown
    assert "Skipped (no usable results): crashed (failed), waiting (queued)." in markdown


def test_the_baseline_is_head_not_the_workspace(exp_show):
    parsed = parse_exp_show(exp_show, "exps.json")
    assert parsed.baseline["train_grounded"]["regions"] is True
    assert parsed.baseline["base"]["seed"] == 13
    assert "workspace" not in {exp.name for exp in parsed.experiments}
    assert len(parsed.experiments) == 9


def test_a_spec_file_adds_tables_and_replaces_builtins(exp_show, tmp_path):
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(exp_show))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "lr:\n"
        "  title: Learning rate\n"
        "  columns: {tagger: 'metrics/tagger.json:test.mner.f1',"
        " GMNER: 'metrics/grounded.json:test.gmner.candidates.f1'}\n"
        "  rows:\n"
        "    lr 1e-3: {}\n"
        "    lr 3e-4: {train.lr: 0.0003}\n"
        "    lr 1e-2: {train.lr: 0.01}\n"
        "    regions off, CE: {train_grounded.regions: false, train_grounded.loss: ce}\n"
        "grounding:\n"
        "  columns: {GMNER F1: 'metrics/grounded.json:test.gmner.candidates.f1'}\n"
        "  rows: {full: {}, w/o regions: {train_grounded.regions: false}}\n"
    )
    markdown = write_ablations(path, spec_path=spec, out=tmp_path / "out.md")
    lr, grounding = markdown.split("## grounding: grounding")
    assert lr.startswith("## lr: Learning rate")
    table = rows(lr)
    assert table["lr 1e-3"] == ["13, 14", "70.00 (n=1)", "57.55 ± 1.91 (n=2)"]  # seed 14 has no tagger metrics
    assert table["lr 3e-4"] == ["15", "72.00 (n=1)", "57.30 (n=1)"]
    assert table["lr 1e-2"] == ["—", "—", "—"]
    assert table["regions off, CE"] == ["13", "—", "36.00 (n=1)"]
    assert "Matching no row: regions-13 (train_grounded.regions=false); regions-14" in lr
    # The loss is no row of this table, so the runs that changed it match no row, the grid run included.
    assert rows(grounding)["w/o regions"] == ["13, 14, 15", "39.07 ± 1.71 (n=3)"]
    assert "Matching no row: full-15 (train.lr=0.0003); ce-13 (train_grounded.loss=\"ce\"); grid-13" in grounding


def test_errors_name_the_file(exp_show, tmp_path):
    bad = tmp_path / "exps.json"
    bad.write_text('[\n  {"rev": "workspace",\n   "name": nope}\n]\n')
    with pytest.raises(DataError, match=f"^{bad}:3: malformed JSON"):
        write_ablations(bad, ["grounding"])
    bad.write_text('{"rev": "workspace"}')
    with pytest.raises(DataError, match="not `dvc exp show --json` output"):
        write_ablations(bad, ["grounding"])
    good = tmp_path / "good.json"
    good.write_text(json.dumps(exp_show))
    known = "detector, dlram, grounding, index, init, models, vsgn, vtc"
    with pytest.raises(DataError, match=f"^built-in tables: unknown table 'nope'; known: {known}"):
        write_ablations(good, ["nope"])
    spec = tmp_path / "spec.yaml"
    spec.write_text("mine:\n  rows: {full: {}}\n")
    with pytest.raises(DataError, match=f"^{spec}: table 'mine': columns must map"):
        write_ablations(good, spec_path=spec)


def test_runs_dvc_when_given_no_input(exp_show, monkeypatch, capsys):
    script = f"print({json.dumps(json.dumps(exp_show))})"
    monkeypatch.setattr(ablations, "DVC_COMMAND", [sys.executable, "-c", script])
    write_ablations(None, ["grounding"])
    assert "| full | 13, 14 | 57.55 ± 1.91 (n=2) |" in capsys.readouterr().out
    failing = "import sys; sys.exit('ERROR: you are not inside of a DVC repository')"
    monkeypatch.setattr(ablations, "DVC_COMMAND", [sys.executable, "-c", failing])
    with pytest.raises(DataError, match="^dvc exp show --json: dvc failed .exit 1.: ERROR: you are not inside"):
        write_ablations(None, ["grounding"])


def test_cli_command_reads_a_file_or_stdin(exp_show, tmp_path):
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(exp_show))
    result = CliRunner().invoke(app, ["ablations", str(path), "-t", "grounding", "--out", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    assert rows((tmp_path / "t.md").read_text())["regions off"][1] == "39.07 ± 1.71 (n=3)"
    result = CliRunner().invoke(app, ["ablations", "-", "-t", "grounding", "-t", "dlram"], input=json.dumps(exp_show))
    assert result.exit_code == 0, result.output
    assert "## grounding: Grounded tagger" in result.output and "## dlram:" in result.output
    # no pretrain params anywhere: every experiment has the baseline's (unset) ones, so all are "full"
    assert "| w/o TIA | — |" in result.output


def test_bad_input_is_an_error_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "exps.json"
    bad.write_text("[{")
    assert cli_exit_code(monkeypatch, "ablations", str(bad), "--out", str(tmp_path / "t.md")) == 2
    assert f"error: {bad}:1: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()
