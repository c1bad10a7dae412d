"""Ablation tables (Markdown, mean ± sample std over seeds) from the JSON of `dvc exp show --json`.

A table is a set of rows, each a name and the params.yaml values that define it, and a set of metric columns.
A row's settings are the baseline's params, overridden by the row's own: a row with no params is the full
model, and an experiment is averaged into a row only when it differs from the baseline in exactly that row's
params (and the seed). Any other experiment (a grid run changing two ablated params, another table's
ablation, a learning-rate trial) is listed as matching no row, with what it changed. Seeds are the distinct
``base.seed`` values.

The JSON (DVC 3.x) is a list of revisions: the workspace first, then commits, each
``{rev, name, data: {timestamp, params: {file: {data}}, metrics: {file: {data} | {error}}}, error,
experiments: [{name, executor: {state} | null, revs: [revision]}] | null}``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from gmner.core.atomic import write_text
from gmner.core.errors import DataError

PARAMS_FILE = "params.yaml"
SEED_PARAM = "base.seed"
DVC_COMMAND = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
MISSING = object()  # a param or metric the revision does not have

_GROUNDED_COLUMNS = {
    "test GMNER F1": "metrics/grounded.json:test.gmner.candidates.f1",
    "test MNER F1": "metrics/grounded.json:test.mner.f1",
    "test EEG F1": "metrics/grounded.json:test.eeg.candidates.f1",
    "dev GMNER F1": "metrics/grounded.json:dev.gmner.candidates.f1",
}

# Each table: title, columns (label -> "metrics file:dotted key"), rows (name -> {dotted param: value}).
_INDEX_COLUMNS = {
    "test GMNER F1": "metrics/index.json:test.gmner.candidates.f1",
    "test MNER F1": "metrics/index.json:test.mner.f1",
    "test EEG F1": "metrics/index.json:test.eeg.candidates.f1",
    "dev GMNER F1": "metrics/index.json:dev.gmner.candidates.f1",
}
# configs/vtc.yaml's settings that differ from params.yaml's.
_VTC = {"pretrain.sgla": True, "pretrain.objects": "connector", "pretrain.tia": False, "pretrain.eoa": False,
        "pretrain.gate": False, "pretrain.t2i": False, "train_grounded.connector": True}
# Each table: title, columns (label -> "metrics file:dotted key"), rows (name -> {dotted param: value}).
BUILTIN_TABLES: dict[str, dict] = {
    "dlram": {
        "title": "DLRAM pre-training (TIA + EOA + T2I, no SGLA, no connector), fine-tuned as H-Index + DLRAM",
        "columns": _INDEX_COLUMNS,
        "rows": {
            "full": {},
            "w/o TIA": {"pretrain.tia": False},
            "w/o EOA": {"pretrain.eoa": False},
            "w/o T2I": {"pretrain.t2i": False},
        },
    },
    "index": {
        "title": "Index generation: hierarchical (H-Index) vs flat head, from DLRAM pre-training vs from scratch",
        "columns": _INDEX_COLUMNS,
        "rows": {
            "hierarchical, from pretrain (H-Index + DLRAM)": {},
            "hierarchical, from scratch (H-Index)": {"train_index.init": "none"},
            "flat, from scratch": {"train_index.init": "none", "train_index.head": "flat"},
        },
    },
    "vtc": {
        "title": "VTC (configs/vtc.yaml): SGLA through the shared-private connector, DLRAM's objectives off; the "
                 "connector's outputs as visual tokens of the text encoder and keys of the grounding head",
        "columns": {**_GROUNDED_COLUMNS, "dev MNER F1": "metrics/grounded.json:dev.mner.f1"},
        "rows": {
            "full": _VTC,
            "w/o visual tokens (grounding head only)": {**_VTC, "train_grounded.visual_tokens": False},
            "w/o graph branch": {**_VTC, "pretrain.connector.graph": False},
            "w/o MoE": {**_VTC, "pretrain.connector.moe": False},
            "w/o coupling": {**_VTC, "pretrain.coupling": False},
        },
    },
    "grounding": {
        "title": "Grounded tagger",
        "columns": _GROUNDED_COLUMNS,
        "rows": {
            "full": {},
            "regions off": {"train_grounded.regions": False},
            "global feature off": {"train_grounded.global_feature": False},
            "CE instead of KL": {"train_grounded.loss": "ce"},
            "captions on": {"train_grounded.captions": True},
            "generated image on": {"train_grounded.generated_image": True},
            "top_k 4": {"train_grounded.top_k": 4},
        },
    },
    "init": {
        "title": "Fine-tuning from the pretrain checkpoint vs from scratch (same architecture)",
        "columns": _GROUNDED_COLUMNS,
        "rows": {
            "from pretrain": {},
            "from scratch": {"train_grounded.init": "none"},
        },
    },
    "vsgn": {
        "title": "VSGN",
        "columns": {
            "dev MNER F1": "metrics/vsgn.json:dev.mner.f1",
            "test MNER F1": "metrics/vsgn.json:test.mner.f1",
        },
        # The paper's Table 4 rows; each names `captions` itself (the sample's default is off), so the rows stay
        # the paper's whatever the baseline.
        "rows": {
            "VSGN (CIR, with descriptions)": {"train_vsgn.captions": True},
            "w/o VSG (token-to-patch attention)": {"train_vsgn.captions": True, "train_vsgn.vsg": False},
            "CIR -> concatenation": {"train_vsgn.captions": True, "train_vsgn.fusion": "concat"},
            "CIR -> weighted sum": {"train_vsgn.captions": True, "train_vsgn.fusion": "sum"},
            "w/o description": {"train_vsgn.captions": False},
            "w/o VSG & CIR (attention, concatenation)": {"train_vsgn.captions": True, "train_vsgn.vsg": False,
                                                         "train_vsgn.fusion": "concat"},
        },
    },
    "detector": {
        "title": "Detector: selective search (ranked, unranked) vs the oracle upper bound, KL vs CE region loss",
        "columns": {
            **{f"{split} GMNER {model}": f"metrics/{model}.json:{split}.gmner.candidates.f1"
               for split in ("dev", "test") for model in ("grounded", "index")},
            **{f"{split} coverage@16": f"metrics/detect.json:{split}.box_coverage.at_16" for split in ("dev", "test")},
        },
        "rows": {
            "selective search, ranked": {},
            "selective search, unranked": {"detect.selective_search.ranking": "none"},
            "oracle (upper bound)": {"detect.backend": "oracle"},
            "CE instead of KL": {"train_grounded.loss": "ce", "train_index.region_loss": "ce"},
        },
    },
    "models": {
        "title": "Every model, full settings",
        "columns": {
            f"{split} {task} {model}": f"metrics/{model}.json:{split}.{key}.f1"
            for task, key, models in (("MNER", "mner", ("tagger", "vsgn", "bga")),
                                      ("GMNER", "gmner.candidates", ("tagger", "grounded", "index")))
            for split in ("dev", "test")
            for model in models
        },
        "rows": {"full": {}},
    },
}


@dataclass(frozen=True)
class Experiment:
    name: str
    timestamp: str  # ISO 8601, so newer compares greater
    params: dict  # params.yaml as the revision had it
    metrics: dict  # metrics file -> its data


@dataclass(frozen=True)
class ExpShow:
    source: str  # where the JSON came from, for messages
    baseline: dict  # params.yaml of the baseline commit: the defaults of every ablated param
    experiments: list[Experiment]
    skipped: list[str]  # failed, queued, running or unreadable revisions, with the reason


def read_exp_show(input_path: str | Path | None) -> tuple[Any, str]:
    """The parsed JSON and a name for messages: from a file, from stdin (``-``), or from running
    ``dvc exp show --json`` here (``None``)."""
    if input_path is None:
        source = "dvc exp show --json"
        try:
            done = subprocess.run(DVC_COMMAND, capture_output=True, text=True)
        except OSError as err:
            raise DataError(source, f"cannot run dvc: {err}") from None
        if done.returncode != 0:
            message = done.stderr.strip().splitlines()[-1:] or ["no message"]  # the last line says why
            raise DataError(source, f"dvc failed (exit {done.returncode}): {message[0]}")
        text = done.stdout
    elif str(input_path) == "-":
        source, text = "<stdin>", sys.stdin.read()
    else:
        source = str(input_path)
        try:
            text = Path(input_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(source, f"cannot read: {err}") from None
    try:
        return json.loads(text), source
    except json.JSONDecodeError as err:
        raise DataError(f"{source}:{err.lineno}", f"malformed JSON: {err.msg}") from None


def parse_exp_show(doc: Any, source: str) -> ExpShow:
    """The usable experiments of a ``dvc exp show --json`` document. The workspace is not one (it repeats the
    baseline or the last applied experiment); commits and their experiments are. The baseline is the first
    commit (HEAD): after a plain ``dvc exp run`` the workspace holds that experiment's params, not the defaults."""
    if not isinstance(doc, list) or not all(isinstance(entry, dict) and "rev" in entry for entry in doc):
        raise DataError(source, "not `dvc exp show --json` output: expected a list of revisions with a 'rev'")
    experiments, skipped = [], []
    for entry in doc:
        if entry["rev"] == "workspace":
            continue
        for revision, state in _revisions(entry):
            reason = _skip_reason(revision, state)
            if reason:
                skipped.append(f"{_name(revision)} ({reason})")
            else:
                data = revision["data"]
                experiments.append(
                    Experiment(_name(revision), data.get("timestamp") or "", _params(revision), _metrics(revision))
                )
    # HEAD's params; the workspace's only when no commit is readable (sorted() keeps the order otherwise).
    usable = sorted((entry for entry in doc if _usable(entry)), key=lambda entry: entry["rev"] == "workspace")
    if not usable:
        raise DataError(source, "no readable baseline revision (workspace or commit) to take default params from")
    baseline = _params(usable[0])
    return ExpShow(source, baseline, experiments, skipped)


def read_spec(spec_path: str | Path) -> dict[str, dict]:
    """Tables from a YAML file laid out like ``BUILTIN_TABLES``; they add to (or replace) the built-in ones."""
    where = str(spec_path)
    try:
        spec = yaml.safe_load(Path(spec_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(where, f"cannot read the table spec: {err}") from None
    if not isinstance(spec, dict) or not spec:
        raise DataError(where, "expected a mapping of table name -> {title?, columns, rows}")
    for name, table in spec.items():
        _check_table(table, f"{where}: table {name!r}")
    return spec


def render(exp_show: ExpShow, tables: Mapping[str, dict], names: list[str]) -> str:
    """Markdown: one section per named table, then the experiments no table could use."""
    sections = [_render_table(name, tables[name], exp_show) for name in names]
    if exp_show.skipped:
        sections.append("Skipped (no usable results): " + ", ".join(exp_show.skipped) + ".\n")
    return "\n".join(sections)


def write_ablations(
    input_path: str | Path | None,
    table_names: list[str] | None = None,
    spec_path: str | Path | None = None,
    out: str | Path | None = None,
) -> str:
    """Build the named tables (default: the spec file's tables, else every built-in one) from
    ``dvc exp show --json`` output; write the Markdown atomically to ``out``, or print it. Returns it."""
    spec = read_spec(spec_path) if spec_path is not None else {}
    tables = {**BUILTIN_TABLES, **spec}
    table_names = table_names or list(spec or BUILTIN_TABLES)
    unknown = [name for name in table_names if name not in tables]
    if unknown:
        raise DataError(
            str(spec_path) if spec_path is not None else "built-in tables",
            f"unknown table {', '.join(map(repr, unknown))}; known: {', '.join(sorted(tables))}",
        )
    doc, source = read_exp_show(input_path)
    markdown = render(parse_exp_show(doc, source), tables, table_names)
    if out is None:
        sys.stdout.write(markdown)
    else:
        write_text(out, markdown)
    return markdown


def _render_table(name: str, table: dict, exp_show: ExpShow) -> str:
    rows: dict[str, dict] = table["rows"]
    columns: dict[str, str] = table["columns"]
    baseline = {key: value for key, value in _flatten(exp_show.baseline) if key != SEED_PARAM}
    ablated = sorted(set(baseline) | {key for settings in rows.values() for key in settings})
    defaults = {key: baseline.get(key, MISSING) for key in ablated}
    settings = {row: {**defaults, **own} for row, own in rows.items()}
    notes = []
    first_with: dict[str, str] = {}
    for row, values in settings.items():
        same = first_with.setdefault(_show_settings(values), row)
        if same != row:
            notes.append(f"{row}: the same settings as {same} in this baseline, so the same experiments.")
    matched: dict[str, list[Experiment]] = {row: [] for row in rows}
    unmatched = []
    for exp in exp_show.experiments:
        hits = [row for row in rows if _matches(exp.params, settings[row])]
        for row in hits:
            matched[row].append(exp)
        if not hits:
            changed = [
                f"{key}={_show(_lookup(exp.params, key))}"
                for key in ablated
                if not _matches(exp.params, {key: defaults[key]})
            ]
            unmatched.append(f"{exp.name} ({', '.join(changed)})" if changed else exp.name)

    lines = [
        f"## {name}: {table.get('title', name)}",
        "",
        "| | seeds | " + " | ".join(map(_cell, columns)) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row, exps in matched.items():
        by_seed = _one_per_seed(exps, row, notes)
        seeds = ", ".join(_show(seed) for seed in by_seed) or "—"
        cells = [_summary([_metric(exp, ref, exp_show.source) for exp in by_seed.values()]) for ref in columns.values()]
        lines.append(f"| {_cell(row)} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample standard deviation over seeds ({SEED_PARAM}); n: seeds with the metric."]
    if unmatched:
        notes.append("Matching no row: " + "; ".join(unmatched) + ".")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _one_per_seed(exps: list[Experiment], row: str, notes: list[str]) -> dict:
    """The newest experiment of each seed (a re-run supersedes), seeds sorted; re-runs are noted."""
    groups = defaultdict(list)
    for exp in exps:
        groups[_lookup(exp.params, SEED_PARAM)].append(exp)
    kept = {}
    for seed in sorted(groups, key=_seed_order):
        runs = sorted(groups[seed], key=lambda exp: exp.timestamp)
        kept[seed] = runs[-1]
        if len(runs) > 1:
            notes.append(
                f"{row}: seed {_show(seed)} has {len(runs)} experiments ({', '.join(e.name for e in runs)}); "
                f"the newest, {runs[-1].name}, is used."
            )
    return kept


def _seed_order(seed: Any) -> tuple:
    """Numbers in numeric order (2 before 13), anything else after them by its text."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, seed, "")
    return (1, 0, _show(seed))


def _summary(values: list) -> str:
    values = [value for value in values if value is not MISSING]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _metric(exp: Experiment, ref: str, source: str) -> Any:
    file, _, key = ref.partition(":")
    value = _lookup(exp.metrics.get(file, {}), key)
    if value is not MISSING and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise DataError(f"{source}: experiment {exp.name}", f"metric {ref} is {value!r}, not a number")
    return value


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _matches(params: dict, settings: Mapping[str, Any]) -> bool:
    """Every setting equal, and True != 1: YAML's booleans and integers are different settings."""
    for key, want in settings.items():
        have = _lookup(params, key)
        if have is MISSING or want is MISSING:
            if have is not want:
                return False
        elif type(have) is bool or type(want) is bool:
            if have is not want:
                return False
        elif have != want:
            return False
    return True


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def _revisions(entry: dict) -> Iterator[tuple[dict, str | None]]:
    """A commit and then its experiments, each with its executor state (None once finished and collected)."""
    yield entry, None
    for exp_range in entry.get("experiments") or []:
        state = (exp_range.get("executor") or {}).get("state")
        for revision in exp_range.get("revs") or []:
            yield revision, state


def _skip_reason(revision: dict, state: str | None) -> str | None:
    if state in ("queued", "running", "failed"):
        return state  # a failed run's data are the baseline's, a queued one has none
    if revision.get("error"):
        return f"error: {revision['error'].get('msg') or revision['error']}"
    if not _usable(revision):
        return "no params"
    if not _metrics(revision):
        return "no metrics"
    return None


def _usable(revision: dict) -> bool:
    return not revision.get("error") and isinstance(revision.get("data"), dict) and bool(_params(revision))


def _params(revision: dict) -> dict:
    return ((revision.get("data") or {}).get("params") or {}).get(PARAMS_FILE, {}).get("data") or {}


def _metrics(revision: dict) -> dict:
    files = (revision.get("data") or {}).get("metrics") or {}
    return {file: content["data"] for file, content in files.items() if isinstance(content, dict) and "data" in content}


def _name(revision: dict) -> str:
    return revision.get("name") or str(revision.get("rev", "?"))[:7]


def _check_table(table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise DataError(where, "expected a mapping with columns and rows")
    columns, rows = table.get("columns"), table.get("rows")
    if (
        not isinstance(columns, dict)
        or not columns
        or not all(isinstance(ref, str) and ":" in ref for ref in columns.values())
    ):
        raise DataError(where, "columns must map labels to 'metrics file:dotted.key' strings")
    if not isinstance(rows, dict) or not rows or not all(isinstance(own, dict) for own in rows.values()):
        raise DataError(where, "rows must map row names to {dotted.param: value} (an empty one is the full model)")


def _show_settings(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_show(value)}" for key, value in sorted(settings.items()))


def _show(value: Any) -> str:
    return "unset" if value is MISSING else json.dumps(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
