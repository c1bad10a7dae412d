"""A user's mistake is one line naming it: every param checked against gmner.core.param_spec before any work,
and the command line's contract (``error: <where>: <what>``, exit status 2, no traceback unless --debug)."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gmner.core import schema
from gmner.core.param_spec import SPEC, Group, ParamError, show
from gmner.core.params import config_overrides, load_params, read_yaml, resolve_device
from gmner.pipeline import report_user_errors, user_error

from helpers import REPO, TAGS, TOKENS, entity, tweet_row


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    return path


def error_of(path, *overrides: str) -> str:
    with pytest.raises(ParamError) as info:
        load_params(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("override, message", [
    # types: a string, a bool or a float where an integer goes
    ("train.epochs=abc", "train.epochs: 'abc' is not an integer >= 1"),
    ("train.epochs=true", "train.epochs: true is not an integer >= 1"),
    ("train.epochs=1.0", "train.epochs: 1.0 is not an integer >= 1"),
    ("train_grounded.regions=1", "train_grounded.regions: 1 is not true or false"),
    ("train.encoder=3", "train.encoder: 3 is not a model: tiny, a hub id or a local folder"),
    ("synthesize.theta=.nan", "synthesize.theta: NaN is not a number in [-1, 1]"),
    # ranges
    ("evaluate.iou_threshold=-1", "evaluate.iou_threshold: -1 is not a number in [0, 1]"),
    ("detect.top_k=0", "detect.top_k: 0 is not an integer >= 1"),
    ("train.lr=0", "train.lr: 0 is not a number > 0"),
    ("train.dropout=1", "train.dropout: 1 is not a number in [0, 1)"),
    ("base.seed=-1", "base.seed: -1 is not an integer in [0, 4294967295]"),
    ("pretrain.negatives=1", "pretrain.negatives: 1 is not an integer >= 2"),
    ("sample.image_size=32", "sample.image_size: 32 is not an integer >= 64"),
    # choices, the device among them
    ("detect.backend=yolo", "detect.backend: 'yolo' is not one of selective_search, torchvision, zero_shot, oracle"),
    ("prepare.format=xml", "prepare.format: 'xml' is not one of twitter-gmner, conll-mner"),
    ("base.device=gpu", "base.device: 'gpu' is not a device: cpu, cuda, cuda:N, mps or auto"),
    ("base.device=cuda:x", "base.device: 'cuda:x' is not a device: cpu, cuda, cuda:N, mps or auto"),
    # nullable values
    ("train_vsgn.local_window=0", "train_vsgn.local_window: 0 is not null or an integer >= 1"),
    ("evaluate.regions=3", "evaluate.regions: 3 is not null or a path"),
    ("detect.torchvision.categories=[a, 1]", "detect.torchvision.categories[1]: 1 is not a string"),
    # fit: mappings take the `train` group's keys, present in params.yaml or not
    ("pretrain.fit.epochs=0", "pretrain.fit.epochs: 0 is not an integer >= 1"),
    ("train_vsgn.fit.dropout=2", "train_vsgn.fit.dropout: 2 is not a number in [0, 1)"),
    ("train_index.fit.precision=fp8", "train_index.fit.precision: 'fp8' is not one of fp32, fp16, bf16"),
    ("++train_bga.fit={lr: -1}", "train_bga.fit.lr: -1 is not a number > 0"),
    ("train_bga.fit=[]", "train_bga.fit: [] is not a mapping of params"),
    # policies: per reason, the actions it allows
    ("prepare.policy.bad_box=repair", "prepare.policy.bad_box: 'repair' is not one of error, skip"),
    ("detect.policy.missing_image=ignore", "detect.policy.missing_image: 'ignore' is not one of error, skip"),
    ("prepare.files={train: train.txt, dev: ''}", "prepare.files.dev: '' is not a path"),
    # lists and their items
    ("evaluate.splits=dev", "evaluate.splits: 'dev' is not a list (items: a split name)"),
    ("train_bga.thresholds=[0, 2]", "train_bga.thresholds[1]: 2 is not a number in [-1, 1]"),
    ("synthesize.tiny.block_out_channels=[8, 0]", "synthesize.tiny.block_out_channels[1]: 0 is not an integer >= 1"),
])
def test_a_bad_value_names_its_key_the_value_and_what_is_allowed(params_file, override, message):
    assert error_of(params_file, override) == message


@pytest.mark.parametrize("override, where", [
    ("detect.topk=3", "detect.topk"),
    ("nokey=1", "nokey"),
    ("train_grounded.fit.epoch=3", "train_grounded.fit.epoch"),
    ("prepare.policy.nope=skip", "prepare.policy.nope"),
    ("features.tiny.vision_cfg.depth=2", "features.tiny.vision_cfg.depth"),
])
def test_an_unknown_key_is_named_with_the_known_ones(params_file, override, where):
    message = error_of(params_file, override)
    assert message.startswith(f"{where}: unknown param; known: ")
    group = SPEC
    for part in where.split(".")[:-1]:
        group = group.child("", part)
    assert message.endswith(", ".join(sorted(group.fields)))


def test_unknown_keys_in_the_params_file_itself_anywhere(params_file):
    text = params_file.read_text()
    for line, typo, where in [("    sigma: 0.8", "    sigmaa: 0.8", "detect.selective_search.sigmaa"),
                              ("  seed: 7", "  sed: 7", "sample.sed"),
                              ("    bad_box: skip", "    bad_bx: skip", "prepare.policy.bad_bx")]:
        params_file.write_text(text.replace(line, typo, 1))
        assert error_of(params_file).startswith(f"{where}: unknown param; known: ")
    params_file.write_text(text + "train_grounde: {top_k: 8}\n")
    assert error_of(params_file).startswith("train_grounde: unknown param; known: base, caption, detect, ")


def test_overrides_that_are_not_key_value_or_not_yaml_or_inside_a_value(params_file):
    assert error_of(params_file, "train.lr") == "train.lr: an override is group.key=value"
    assert error_of(params_file, "train.tiny={hidden_size:").startswith("train.tiny: '{hidden_size:' is not a YAML")
    assert error_of(params_file, "train.lr.x=1") == "train.lr.x: unknown param; train.lr is a single value, not a group"


def test_optional_train_keys_may_be_absent_and_are_checked_when_present(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {epochs: 2, lr: 0.1}\ntrain_vsgn: {fit: {patience: 3}}\n")
    assert load_params(path)["train_vsgn"]["fit"] == {"patience": 3}
    for key, value, allowed in [("grad_accum", 0, "an integer >= 1"), ("group_by_length", 1, "true or false"),
                                ("patience", -1, "an integer >= 0"), ("precision", "fp8", "one of fp32, fp16, bf16")]:
        assert error_of(path, f"train.{key}={value}") == f"train.{key}: {show(value)} is not {allowed}"


def test_params_files_that_are_not_a_yaml_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    for text, message in [("base:\n  seed: [1\n", ":3:1: not valid YAML: expected ',' or ']', but got '<stream end>'"),
                          ("- a\n- b\n", ': a params file is a mapping of param groups, not ["a", "b"]'),
                          ("", ": a params file is a mapping of param groups, not null"),
                          ("train:\n  lr: 0.1\n  lr: 0.2\n", ":3:3: not valid YAML: duplicate key 'lr'")]:
        path.write_text(text)
        with pytest.raises(ParamError) as info:
            read_yaml(path)
        assert str(info.value) == f"{path}{message}"
    path.write_bytes(b"train: \xff\n")
    with pytest.raises(ParamError, match=r"params.yaml: not UTF-8 text \(byte 7\)$"):
        read_yaml(path)


def test_a_config_file_is_checked_before_dvc_runs(params_file, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train: {epochs: -3}\n")
    with pytest.raises(ParamError, match=rf"^{config}: train.epochs: -3 is not an integer >= 1$"):
        config_overrides(config, params_file)
    config.write_text("train_grounded: {top_k: 32}\n")  # the rules hold on params.yaml with the config's values
    with pytest.raises(ParamError, match="^train_grounded.top_k: 32 candidates asked for, but detect.top_k keeps 16"):
        config_overrides(config, params_file)


def test_an_unknown_or_absent_device_fails_before_any_work():
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ParamError, match="^--device: 'bogus' is not a device: cpu, cuda, cuda:N, mps or auto$"):
        resolve_device("bogus", "--device")
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ParamError, match=f"^base.device: '{absent}' is not on this machine"):
        resolve_device(absent)


def test_model_config_rules_are_param_errors_at_stage_time():
    from gmner.training.bga import bga_config
    from gmner.training.grounded import grounding_config
    from gmner.training.vsgn import vsgn_config

    params = load_params(REPO / "params.yaml")
    with pytest.raises(ParamError, match="^train_vsgn: hidden size 64 is not divisible by 3 heads$"):
        vsgn_config({**params["train_vsgn"], "heads": 3}, 4, 4)
    with pytest.raises(ParamError, match="^train_bga: sampler stage_epochs must start at 1"):
        bga_config({**params["train_bga"], "stage_epochs": [2, 5, 9]}, 4)
    with pytest.raises(ParamError, match="^train_grounded: hidden size 64 is not divisible by 5 heads$"):
        grounding_config({**params["train_grounded"], "heads": 5}, 4)


# --- the spec covers every param, and agrees with the modules reading them -----------------------------------


def spec_keys(spec, where=""):
    """Dotted keys the spec requires params.yaml to have (not its groups' optional keys, not Map entries)."""
    if not isinstance(spec, Group):
        return {where}
    return set().union(*(spec_keys(item, f"{where}.{key}".lstrip(".")) for key, item in spec.fields.items()
                         if key not in spec.optional))


def tree_keys(tree, spec, where=""):
    if not isinstance(spec, Group) or not isinstance(tree, dict):
        return {where}
    return set().union(*(tree_keys(value, spec.fields[key], f"{where}.{key}".lstrip("."))
                         for key, value in tree.items() if key not in spec.optional))


def test_the_spec_declares_every_param_of_params_yaml_and_of_the_configs_and_no_other():
    params = load_params(REPO / "params.yaml")  # every key known, every value allowed
    assert tree_keys(params, SPEC) == spec_keys(SPEC)  # and no declared param missing from params.yaml
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for config in configs:
        load_params(REPO / "params.yaml", config_overrides(config, REPO / "params.yaml"))


def test_the_specs_choices_are_the_readers():
    from gmner.datasets.prepare import FORMATS, REASONS
    from gmner.models.bga import LOSSES
    from gmner.models.graphs import FUSIONS
    from gmner.models.pointer_decoding import HEADS
    from gmner.pretrain.checkpoint import COMPONENTS, OBJECT_MAPS
    from gmner.vision import models
    from gmner.vision.detectors import BACKENDS
    from gmner.vision.detectors.selective_search import MODES, RANKINGS
    from gmner.vision.features import FILLS
    from gmner.vision.inputs import IMAGE_ACTIONS, SKIP_REASONS

    def choices(path):
        spec = SPEC
        for part in path.split("."):
            spec = spec.child("", part)
        return set(spec.choices) if hasattr(spec, "choices") else spec

    assert choices("prepare.format") == set(FORMATS)
    assert {r: set(choices(f"prepare.policy.{r}")) for r in REASONS} == {r: set(a) for r, a in REASONS.items()}
    assert set(choices("prepare.policy").fields) == set(REASONS)
    for stage in ("detect", "caption", "synthesize", "features"):
        assert set(choices(f"{stage}.policy").fields) == set(SKIP_REASONS)
        assert all(choices(f"{stage}.policy.{r}") == set(IMAGE_ACTIONS) for r in SKIP_REASONS)
    assert choices("detect.backend") == set(BACKENDS)
    assert choices("detect.selective_search.mode") == set(MODES)
    assert choices("detect.selective_search.ranking") == set(RANKINGS)
    assert choices("features.precision") == choices("train.precision") == set(models.PRECISIONS)
    assert choices("features.backend") == choices("synthesize.relevance.backend") == set(models.BACKENDS)
    assert choices("features.masked.fill") == set(FILLS)
    assert choices("train_bga.loss") == set(LOSSES)
    assert choices("train_index.head") == set(HEADS)
    assert choices("train_vsgn.fusion") == set(FUSIONS)
    assert choices("pretrain.objects") == set(OBJECT_MAPS)
    assert set(choices("pretrain.weights").fields) == set(COMPONENTS)


# --- the command line's contract ------------------------------------------------------------------------------


def test_only_mistakes_lose_their_traceback(monkeypatch, capsys):
    assert user_error(FileNotFoundError(2, "No such file or directory", "m/model.json")) == \
        "m/model.json: No such file or directory"
    assert user_error(IsADirectoryError(21, "Is a directory", "a.tmp", None, "out")) == "a.tmp -> out: Is a directory"
    assert user_error(FileNotFoundError("data/x.parquet: run the prepare stage first")) == \
        "data/x.parquet: run the prepare stage first"
    for bug in (RuntimeError("boom"), KeyError("k"), OSError(5, "Input/output error"), ValueError("v")):
        assert user_error(bug) is None
        with pytest.raises(type(bug)):
            report_user_errors(lambda: (_ for _ in ()).throw(bug))
    monkeypatch.setenv("GMNER_DEBUG", "1")
    with pytest.raises(ParamError):
        report_user_errors(load_params, REPO / "params.yaml", ["train.epochs=0"])
    monkeypatch.delenv("GMNER_DEBUG")
    with pytest.raises(SystemExit) as info:
        report_user_errors(load_params, REPO / "params.yaml", ["train.epochs=0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: train.epochs: 0 is not an integer >= 1\n"


@pytest.fixture
def workdir(tmp_path):
    """A folder to run the command in: the repo's params, a fake model folder, a prepared dev split."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "in.jsonl").write_text('{"text": "Ann visits Oslo"}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "syntax.yaml").write_text("base:\n  seed: [13\n")
    (tmp_path / "list.yaml").write_text("- base\n")
    (tmp_path / "config.yaml").write_text("train: {epochs: -3}\n")
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    row = tweet_row(0, None, TOKENS, TAGS, [entity(1, 3, "PER", TOKENS)], split="dev")
    pq.write_table(pa.Table.from_pylist([row], schema=schema.TWEETS), tmp_path / "data" / "prepared" / "dev.parquet")
    return tmp_path


MISTAKES = [  # arguments of `gmner`, and how the one line starts after "error: "
    (["detect", "--set", "detect.topk=3"], "detect.topk: unknown param; known: backend, "),
    (["evaluate", "--set", "evaluate.iou_threshold=-1"], "evaluate.iou_threshold: -1 is not a number in [0, 1]"),
    (["detect", "--set", "detect.top_k=0"], "detect.top_k: 0 is not an integer >= 1"),
    (["train", "--set", "train.epochs=abc"], "train.epochs: 'abc' is not an integer >= 1"),
    (["train", "--set", "nokey=1"], "nokey: unknown param; known: base, "),
    (["train", "--set", "train.lr"], "train.lr: an override is group.key=value"),
    (["pretrain", "--set", "pretrain.fit.epochs=0"], "pretrain.fit.epochs: 0 is not an integer >= 1"),
    (["train", "--params", "syntax.yaml"], "syntax.yaml:3:1: not valid YAML"),
    (["train", "--params", "list.yaml"], "list.yaml: a params file is a mapping of param groups"),
    (["train", "--params", "missing.yaml"], "missing.yaml: No such file or directory"),
    (["train", "--params", "adir"], "adir: Is a directory"),
    (["exp-run", "config.yaml", "--dry-run"], "config.yaml: train.epochs: -3 is not an integer >= 1"),
    (["predict", "nomodel", "in.jsonl", "out.jsonl"], "nomodel: not a trained model folder"),
    (["predict", "afile", "in.jsonl", "out.jsonl"], "afile: not a trained model folder"),
    (["predict", "model", "in.jsonl", "adir"], "adir: is a folder, the output a file"),
    (["predict", "model", "in.jsonl", "afile/out.jsonl"], "afile/out.jsonl: afile is a file, not a folder"),
    (["predict", "model", "in.jsonl", "out.jsonl", "--device", "bogus"], "--device: 'bogus' is not a device"),
    (["predict", "model", "missing.jsonl", "out.jsonl"], "missing.jsonl: no such file"),
    (["evaluate", "--model", "nope", "--set", "evaluate.regions=null"], "models/nope/model.json: no model.json"),
]


def gmner(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "gmner.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_no_user_mistake_prints_a_traceback(workdir):
    for args, start in MISTAKES:
        result = gmner(args, workdir)
        lines = result.stderr.splitlines()
        assert (result.returncode, len(lines)) == (2, 1), (args, result.stderr)
        assert lines[0].startswith(f"error: {start}"), (args, lines[0])
        assert not (workdir / "out.jsonl").exists()
    if os.geteuid() != 0:  # root writes anywhere
        (workdir / "ro").mkdir(mode=0o555)
        result = gmner(["predict", "model", "in.jsonl", "ro/out.jsonl"], workdir)
        assert result.returncode == 2 and result.stderr == "error: ro/out.jsonl: the folder ro is not writable\n"


@pytest.mark.slow
def test_debug_shows_the_traceback_and_a_stage_script_keeps_the_contract(workdir):
    result = gmner(["--debug", "train", "--set", "train.epochs=abc"], workdir)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ParamError" in result.stderr
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["epochs"] = True
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    script = [sys.executable, str(REPO / "stages" / "train.py")]
    result = subprocess.run(script, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (2, "error: train.epochs: true is not an integer >= 1\n")
    result = subprocess.run(script, cwd=workdir, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GMNER_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr

