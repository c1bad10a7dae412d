"""The pipeline's stages, listed once, and the one way to run one.

``dvc repro`` runs stages/<stage>.py, and ``gmner <stage>`` runs the same code outside DVC; both go through
``run``: logging set up the same way (progress on stderr), params.yaml read and checked (with optional
``group.key=value`` overrides), then the stage module's ``run_stage``. A stage's module is imported only
when it runs, so a stage imports (and, in dvc.yaml, depends on) only its own code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    module: str  # holds run_stage(params, ...)
    help: str


STAGES = {
    "sample": Stage("gmner.datasets.sample", "Generate the embedded synthetic sample dataset into data/sample."),
    "prepare": Stage("gmner.datasets.prepare", "Read a dataset folder into data/prepared/<split>.parquet."),
    "detect": Stage("gmner.vision.detect", "Detect top-K candidate regions per image into data/regions.parquet."),
    "caption": Stage("gmner.vision.caption", "Caption every image with BLIP into data/captions.parquet."),
    "synthesize": Stage(
        "gmner.vision.synthesize", "Generate images from tweet text and score the originals' relevance."
    ),
    "features": Stage("gmner.vision.features", "Embed images, regions, generated images and text into data/features/."),
    "train": Stage("gmner.training.tagger", "Train the transformer + CRF text tagger into models/tagger."),
    "pretrain": Stage(
        "gmner.training.pretrain", "Pre-train the text encoder and region connector (DLRAM, VTC): models/pretrain."
    ),
    "train_grounded": Stage(
        "gmner.training.grounded", "Train the CRF tagger with a grounding head into models/grounded."
    ),
    "train_index": Stage(
        "gmner.training.index", "Train the BART index-generation model (H-Index style) into models/index."
    ),
    "train_vsgn": Stage(
        "gmner.training.vsgn", "Train the VSGN MNER model (subword / patch graphs, CIR) into models/vsgn."
    ),
    "train_bga": Stage(
        "gmner.training.bga", "Train BGA-MNER (generative alignment, text-only inference) into models/bga."
    ),
    "evaluate": Stage(
        "gmner.evaluation.stage", "Predict the prepared splits with models/<model>; write metrics/<model>.json."
    ),
}


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


def run(name: str, params_path: str | Path = "params.yaml", overrides: list[str] | None = None, **options) -> None:
    """Run stage ``name`` with params.yaml at ``params_path`` and ``overrides``; ``options`` go to its
    ``run_stage`` (evaluate's ``model``)."""
    from gmner.core.params import load_params

    configure_logging()
    params = load_params(params_path, overrides)
    importlib.import_module(STAGES[name].module).run_stage(params, **options)


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user's mistake, or None for anything else (a bug keeps its traceback).

    Mistakes are bad input and params (DataError), an unreachable model (ModelUnavailable), and an OSError
    naming a path (missing, a directory where a file should be, not writable, ...), including the stages'
    own FileNotFoundError("<path>: ... run the X stage first"), which carries no errno."""
    from gmner.core.errors import DataError, ModelUnavailable

    if isinstance(err, (DataError, ModelUnavailable)):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None:
        paths = " -> ".join(str(path) for path in (err.filename, err.filename2) if path is not None)
        return f"{paths}: {err.strerror or err}"
    if isinstance(err, FileNotFoundError) and err.errno is None:
        return str(err)
    return None


def report_user_errors(call, *args, **kwargs) -> None:
    """``call(*args, **kwargs)``, with a user's mistake (``user_error``) ending as one line ``error: <where>:
    <what>`` and exit status 2, not a traceback; with GMNER_DEBUG=1 (``gmner --debug``) it keeps the traceback."""
    try:
        call(*args, **kwargs)
    except Exception as err:
        message = user_error(err)
        if message is None or os.environ.get("GMNER_DEBUG") == "1":
            raise
        print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)  # one line, whatever the message holds
        raise SystemExit(2) from None


def main(name: str, argv: list[str] | None = None) -> None:
    """Entry point of stages/<name>.py (what dvc.yaml runs)."""
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=STAGES[name].help)
    if name == "evaluate":
        parser.add_argument("--model", default="tagger", help="model folder under models/ (default: tagger)")
    options = vars(parser.parse_args(argv))
    report_user_errors(run, name, **options)
