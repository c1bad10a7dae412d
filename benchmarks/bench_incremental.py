"""Adding 5 % new tweets: model calls and wall time of the incremental re-run of the per-item vision stages.

The protocol is gmner.incremental's (base run without every 20th tweet, incremental re-run with them back,
scratch run in a fresh root), on the embedded sample (params.yaml sizes unless --sizes says otherwise).

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
import sys
import tempfile
from pathlib import Path

import torch

from gmner.core.params import load_params
from gmner.incremental import SAMPLE_ROOT, VISION_STAGES, Incremental, run_incremental

REPO = Path(__file__).resolve().parents[1]


def bench_params(path: Path = REPO / "params.yaml") -> dict:
    params = copy.deepcopy(load_params(path))
    # Relative: the stages put the cache under their root, and generated image paths match across roots.
    params["base"].update(data_root=SAMPLE_ROOT, cache_root=".cache")
    return params


def report(exp: Incremental) -> str:
    head = (f"{'stage':<14}{'scratch calls':>14}{'incr calls':>12}{'ratio':>8}"
            f"{'scratch wall s':>16}{'incr wall s':>13}{'ratio':>8}  outputs identical")
    lines = [f"{exp.tweets} tweets, {exp.dropped} added to the base ({100 * exp.dropped / exp.tweets:.1f} %)", head]
    for name, stage in VISION_STAGES.items():
        scr, inc = exp.scratch[name], exp.incremental[name]
        lines.append(_row(name, scr.summary["model_calls"], inc.summary["model_calls"], scr.wall_s, inc.wall_s)
                     + f"  {'yes' if exp.identical[name] else 'NO'}")
        for part in stage.passes:  # runner passes: wall_s without model loading
            a, b = scr.summary[part], inc.summary[part]
            lines.append(_row(f"  {part}", a["model_calls"], b["model_calls"], a["wall_s"], b["wall_s"]))
    runs = (exp.scratch, exp.incremental)
    calls = [sum(run[n].summary["model_calls"] for n in VISION_STAGES) for run in runs]
    walls = [sum(run[n].wall_s for n in VISION_STAGES) for run in runs]
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
        exp = run_incremental(params, work, sizes, args.every)
    print(report(exp))
    return 0 if all(exp.identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
