"""The `gmner` command: every pipeline stage, plus prediction on new tweets.

Stage commands run exactly what `dvc repro` runs (the same `run_stage` functions the scripts in stages/
call), with optional `--set group.key=value` overrides for one-off runs outside DVC.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read")
SetOpt = typer.Option(None, "--set", help="override a param, e.g. --set train.lr=3e-5 (repeatable)")

# command name -> (library module holding run_stage, help text)
STAGES = {
    "sample": ("gmner.sample", "Generate the embedded synthetic sample dataset into data/sample."),
    "prepare": ("gmner.prepare", "Read a dataset folder into data/prepared/<split>.parquet."),
    "detect": ("gmner.detect", "Detect top-K candidate regions per image into data/regions.parquet."),
    "caption": ("gmner.caption", "Caption every image with BLIP into data/captions.parquet."),
    "synthesize": ("gmner.synthesize", "Generate images from tweet text and score the originals' relevance."),
    "features": ("gmner.features", "Embed images, regions, generated images and text into data/features/."),
    "train": ("gmner.train_tagger", "Train the transformer + CRF text tagger into models/tagger."),
    "train_index": ("gmner.train_index", "Train the BART index-generation model (H-Index style) into models/index."),
    "train_grounded": ("gmner.train_grounded", "Train the CRF tagger with a region-grounding head into models/grounded."),
}


def _stage_command(module: str):
    def command(params: Path = ParamsOpt, overrides: Optional[list[str]] = SetOpt) -> None:
        from gmner.params import load_params

        importlib.import_module(module).run_stage(load_params(params, overrides))

    return command


for _name, (_module, _help) in STAGES.items():
    app.command(_name, help=_help)(_stage_command(_module))


@app.command(help="Predict with a trained model on the prepared splits and write metrics/<model>.json.")
def evaluate(
    model: str = typer.Option("tagger", help="model folder name under models/"),
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    from gmner.evaluation import run_stage
    from gmner.params import load_params

    run_stage(load_params(params, overrides), model)


@app.command(help="Predict entities (and regions) for a JSONL of tweets: {text | tokens, image?, id?} per line.")
def predict(
    model_dir: Path = typer.Argument(..., help="a trained model folder, e.g. models/tagger"),
    input_path: Path = typer.Argument(..., help="input JSONL"),
    output_path: Path = typer.Argument(..., help="output JSONL"),
    device: str = typer.Option("cpu", help="cpu, cuda, or auto"),
    draw: Optional[Path] = typer.Option(
        None, "--draw", help="also draw each line's image with its entities' boxes into DIR/<id>.png", metavar="DIR"
    ),
) -> None:
    from gmner.jsonl_predict import predict_jsonl

    predict_jsonl(model_dir, input_path, output_path, device=device, draw_dir=draw)


def main() -> None:
    """Console entry point: bad input ends with its location on one line, not a traceback."""
    from gmner.errors import DataError

    try:
        app()
    except DataError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
