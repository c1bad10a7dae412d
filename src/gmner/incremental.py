"""The incremental-run protocol: what adding tweets to a dataset costs the per-item vision stages, and whether
the outputs then equal a from-scratch run byte for byte. benchmarks/bench_incremental.py reports it on the
sample; tests/test_incremental.py checks it on a small one.

1. base: the sample without every ``every``-th tweet of each split (their images and xml stay,
   unreferenced); prepare, then detect, caption, synthesize, features from an empty cache (cold).
2. incremental: the full CoNLL files back in place; prepare and the four stages again with the same cache.
3. scratch: in a second root with a fresh cache, prepare the full sample and run the four stages.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from gmner.core.atomic import write_text


class VisionStage(NamedTuple):
    module: str  # holds run_stage(params, root)
    summary: str  # the summary JSON it writes under data/
    outputs: tuple[str, ...]  # globs of its Parquet outputs under data/
    passes: tuple[str, ...] = ()  # its runner passes, each a sub-summary


VISION_STAGES = {
    "detect": VisionStage("gmner.vision.detect", "regions_summary.json", ("regions.parquet",)),
    "caption": VisionStage("gmner.vision.caption", "caption_summary.json", ("captions.parquet",)),
    "synthesize": VisionStage("gmner.vision.synthesize", "synthesize_summary.json", ("synthesized.parquet",),
                              ("generate", "relevance")),
    "features": VisionStage("gmner.vision.features", "features_summary.json", ("features/*.parquet",),
                            ("images", "regions", "generated", "text", "masked")),
}
PREPARED = ("prepared/*.parquet",)
ALL_OUTPUTS = PREPARED + tuple(pattern for stage in VISION_STAGES.values() for pattern in stage.outputs)
SAMPLE_ROOT = "data/sample"  # relative, so prepared image paths (and the outputs) are the same in every root


@dataclass
class StageRun:
    summary: dict  # the stage's <stage>_summary.json
    wall_s: float  # the whole run_stage call, model loading included


def run_pipeline(params: dict, root: Path, stages: Sequence[str] = tuple(VISION_STAGES)) -> dict[str, StageRun]:
    """prepare (base.data_root read relative to ``root``), then the vision ``stages`` in order."""
    from gmner.datasets import prepare

    with contextlib.chdir(root):
        prepare.run_stage(params, root / "data" / "prepared")
    runs = {}
    for name in stages:
        stage = VISION_STAGES[name]
        start = time.perf_counter()
        importlib.import_module(stage.module).run_stage(params, root)
        wall = time.perf_counter() - start
        runs[name] = StageRun(json.loads((root / "data" / stage.summary).read_text()), wall)
    return runs


def parquet_outputs(root: Path, patterns: tuple[str, ...]) -> dict[str, bytes]:
    """Path under data/ -> bytes of every file matching ``patterns`` there."""
    data = root / "data"
    return {p.relative_to(data).as_posix(): p.read_bytes() for pattern in patterns for p in sorted(data.glob(pattern))}


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


@dataclass
class Incremental:
    dropped: int  # tweets left out of the base dataset
    tweets: int  # tweets of the full dataset
    base: dict[str, StageRun]  # the cold run on the base dataset
    incremental: dict[str, StageRun]  # the re-run with the left-out tweets back, same cache
    scratch: dict[str, StageRun]  # a run on the full dataset in another root, fresh cache
    base_outputs: dict[str, bytes]  # every Parquet file of the base run, by path under data/
    identical: dict[str, bool]  # stage (and "prepare") -> incremental outputs == scratch outputs


def run_incremental(params: dict, work: Path, sizes: dict[str, int], every: int) -> Incremental:
    """The protocol under the empty ``work``, with ``params`` whose base.data_root is SAMPLE_ROOT and whose
    base.cache_root is relative (each root then has its own cache)."""
    from gmner.datasets import sample

    full = work / "sample"
    counts = sample.generate(full, seed=int(params["sample"]["seed"]), sizes=sizes,
                             image_size=int(params["sample"]["image_size"]))
    files = params["prepare"]["files"]
    incremental_root, scratch_root = work / "incremental", work / "scratch"
    for root in (incremental_root, scratch_root):
        shutil.copytree(full, root / SAMPLE_ROOT)

    dropped = thin_dataset(incremental_root / SAMPLE_ROOT, files, every)
    base = run_pipeline(params, incremental_root)
    base_outputs = parquet_outputs(incremental_root, ALL_OUTPUTS)
    for name in files.values():
        shutil.copyfile(full / name, incremental_root / SAMPLE_ROOT / name)
    incremental = run_pipeline(params, incremental_root)
    scratch = run_pipeline(params, scratch_root)

    identical = {}
    for name, outputs in {"prepare": PREPARED, **{n: stage.outputs for n, stage in VISION_STAGES.items()}}.items():
        mine, theirs = parquet_outputs(incremental_root, outputs), parquet_outputs(scratch_root, outputs)
        identical[name] = bool(mine) and mine == theirs
    tweets = sum(split["tweets"] for split in counts.values())
    return Incremental(dropped, tweets, base, incremental, scratch, base_outputs, identical)
