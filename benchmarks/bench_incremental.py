"""Adding 5 % new tweets: model calls and wall time of the incremental re-run of the per-item vision stages.

Protocol, on the embedded sample (params.yaml sizes unless --sizes says otherwise):

1. base: the sample without every 20th tweet of each split (their images and xml stay, unreferenced);
   prepare, then detect, caption, synthesize, features from an empty cache (cold).
2. incremental: the full CoNLL files back in place; prepare and the four stages again with the same cache.
3. scratch: in a second root with a fresh cache, prepare the full sample and run the four stages.

Printed per stage: model calls and whole-stage wall time (model loading included) of scratch and
incremental, their ratios (goal: at most 10 % of the calls, under 20 % of the time), and whether every
Parquet output of the incremental run equals the scratch run's byte for byte; below each stage, its
runner passes from <stage>_summary.json (wall_s there excludes model loading). Exits 1 if any differs.

    python benchmarks/bench_incremental.py [--sizes train=320 dev=80 test=80] [--every 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from gmner.core.atomic import write_text
from gmner.core.params import load_params
from gmner.datasets import prepare, sample
from gmner.vision import caption, detect, features, synthesize

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = "data/sample"  # relative, so prepared image paths (and the outputs) are the same in every root


class Stage(NamedTuple):
    module: ModuleType  # its run_stage(params, root)
    summary: str  # the summary JSON it writes under data/
    outputs: tuple[str, ...]  # globs of its Parquet outputs under data/
    passes: tuple[str, ...] = ()  # its runner passes, each a sub-summary


STAGES = {
    "detect": Stage(detect, "regions_summary.json", ("regions.parquet",)),
    "caption": Stage(caption, "caption_summary.json", ("captions.parquet",)),
    "synthesize": Stage(synthesize, "synthesize_summary.json", ("synthesized.parquet",), ("generate", "relevance")),
    "features": Stage(features, "features_summary.json", ("features/*.parquet",),
                      ("images", "regions", "generated", "text")),
}
PREPARED = ("prepared/*.parquet",)
ALL_OUTPUTS = PREPARED + tuple(pattern for stage in STAGES.values() for pattern in stage.outputs)


@dataclass
class StageRun:
    summary: dict  # the stage's <stage>_summary.json
    wall_s: float  # the whole run_stage call


@dataclass
class Experiment:
    dropped: int  # tweets left out of the base dataset
    tweets: int  # tweets of the full dataset
    base: dict[str, StageRun]
    incremental: dict[str, StageRun]
    scratch: dict[str, StageRun]
    base_outputs: dict[str, bytes]  # every Parquet file of the base run, by path under data/
    identical: dict[str, bool]  # stage (and "prepare") -> incremental outputs == scratch outputs


def bench_params(path: Path = REPO / "params.yaml") -> dict:
    params = copy.deepcopy(load_params(path))
    # Relative: the stages put the cache under their root, and generated image paths match across roots.
    params["base"].update(data_root=DATA_ROOT, cache_root=".cache")
    return params


def thin_dataset(data_root: Path, files: dict[str, str], every: int) -> int:
    """Rewrite each split's CoNLL file without its every-th tweet (the every-th, 2 * every-th, ...); return how many."""
    if every < 2:
        raise ValueError(f"every must be at least 2 (1 would drop every tweet), got {every}")
    dropped = 0
    for name in files.values():
        path = data_root / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.startswith("IMGID:")]
        kept = lines[: starts[0] if starts else len(lines)]
        for n, (start, end) in enumerate(zip(starts, [*starts[1:], len(lines)]), 1):
            if n % every:
                kept += lines[start:end]
            else:
                dropped += 1
        write_text(path, "".join(kept))
    return dropped


def run_pipeline(params: dict, root: Path) -> dict[str, StageRun]:
    """prepare (data_root read relative to root), then the four vision stages; stage -> run."""
    with contextlib.chdir(root):
        prepare.run_stage(params, root / "data" / "prepared")
    runs = {}
    for name, stage in STAGES.items():
        start = time.perf_counter()
        stage.module.run_stage(params, root)
        wall = time.perf_counter() - start
        runs[name] = StageRun(json.loads((root / "data" / stage.summary).read_text()), wall)
    return runs


def parquet_outputs(root: Path, patterns: tuple[str, ...]) -> dict[str, bytes]:
    """Path under data/ -> bytes of every file matching ``patterns`` there."""
    data = root / "data"
    return {p.relative_to(data).as_posix(): p.read_bytes() for pattern in patterns for p in sorted(data.glob(pattern))}


def run_experiment(params: dict, work: Path, sizes: dict[str, int], every: int) -> Experiment:
    """The whole protocol under ``work`` (which must be empty or absent)."""
    full = work / "sample"
    counts = sample.generate(full, seed=int(params["sample"]["seed"]), sizes=sizes,
                             image_size=int(params["sample"]["image_size"]))
    files = params["prepare"]["files"]
    incremental_root, scratch_root = work / "incremental", work / "scratch"
    for root in (incremental_root, scratch_root):
        shutil.copytree(full, root / DATA_ROOT)

    dropped = thin_dataset(incremental_root / DATA_ROOT, files, every)
    base = run_pipeline(params, incremental_root)
    base_outputs = parquet_outputs(incremental_root, ALL_OUTPUTS)
    for name in files.values():
        shutil.copyfile(full / name, incremental_root / DATA_ROOT / name)
    incremental = run_pipeline(params, incremental_root)
    scratch = run_pipeline(params, scratch_root)

    identical = {}
    for name, outputs in {"prepare": PREPARED, **{n: stage.outputs for n, stage in STAGES.items()}}.items():
        mine, theirs = parquet_outputs(incremental_root, outputs), parquet_outputs(scratch_root, outputs)
        identical[name] = bool(mine) and mine == theirs
    tweets = sum(split["tweets"] for split in counts.values())
    return Experiment(dropped, tweets, base, incremental, scratch, base_outputs, identical)


def report(exp: Experiment) -> str:
    head = (f"{'stage':<14}{'scratch calls':>14}{'incr calls':>12}{'ratio':>8}"
            f"{'scratch wall s':>16}{'incr wall s':>13}{'ratio':>8}  outputs identical")
    lines = [f"{exp.tweets} tweets, {exp.dropped} added to the base ({100 * exp.dropped / exp.tweets:.1f} %)", head]
    for name, stage in STAGES.items():
        scr, inc = exp.scratch[name], exp.incremental[name]
        lines.append(_row(name, scr.summary["model_calls"], inc.summary["model_calls"], scr.wall_s, inc.wall_s)
                     + f"  {'yes' if exp.identical[name] else 'NO'}")
        for part in stage.passes:  # runner passes: wall_s without model loading
            a, b = scr.summary[part], inc.summary[part]
            lines.append(_row(f"  {part}", a["model_calls"], b["model_calls"], a["wall_s"], b["wall_s"]))
    runs = (exp.scratch, exp.incremental)
    calls = [sum(run[n].summary["model_calls"] for n in STAGES) for run in runs]
    walls = [sum(run[n].wall_s for n in STAGES) for run in runs]
    lines.append(_row("total", *calls, *walls))
    lines.append(f"prepared tables identical: {'yes' if exp.identical['prepare'] else 'NO'}")
    return "\n".join(lines)


def _row(label: str, scratch_calls: int, incremental_calls: int, scratch_s: float, incremental_s: float) -> str:
    a, b = scratch_calls, incremental_calls
    return (f"{label:<14}{a:>14}{b:>12}{_ratio(b, a):>8}"
            f"{scratch_s:>16.2f}{incremental_s:>13.2f}{_ratio(incremental_s, scratch_s):>8}")


def _ratio(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _split_size(item: str) -> tuple[str, int]:
    split, sep, count = item.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{item!r} is not split=count")
    return split, int(count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=[], type=_split_size, metavar="SPLIT=N",
                        help="tweets per split; splits not named keep params.yaml's sample sizes")
    parser.add_argument("--every", type=int, default=20, help="the base leaves out every N-th tweet of each split")
    parser.add_argument("--workdir", type=Path, help="keep the run here (an empty or new folder); default: a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = bench_params()
    sizes = {split: int(params["sample"][split]) for split in params["prepare"]["files"]} | dict(args.sizes)
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        exp = run_experiment(params, work, sizes, args.every)
    print(report(exp))
    return 0 if all(exp.identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
