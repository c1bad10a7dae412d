"""The `gmner` command: every pipeline stage, plus prediction on new tweets.

Stage commands run exactly what `dvc repro` runs (gmner.pipeline.run, as the scripts in stages/ do), with
optional `--set group.key=value` overrides of params, for one-off runs outside DVC. A mistake in the input,
the params or the paths ends with one line `error: <where>: <what>` (exit status 2); --debug shows its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from gmner.core.errors import DataError
from gmner.pipeline import STAGES, report_user_errors, run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read")
SetOpt = typer.Option(None, "--set", help="override a param, e.g. --set train.lr=3e-5 (repeatable)")


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error (also: GMNER_DEBUG=1)"),
) -> None:
    if debug:
        os.environ["GMNER_DEBUG"] = "1"  # read by report_user_errors, around the whole command


def _check_writable(path: Path, folder: bool = False) -> None:
    """Refuse, before the model runs, an output file (or ``folder``) that cannot be written: a folder where a
    file goes or the reverse, or under a file or a folder this process may not write to (missing folders on
    the way are created)."""
    if path.exists() and path.is_dir() != folder:
        raise DataError(str(path), "is a file, the output is a folder" if folder else "is a folder, the output a file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(str(path), f"{parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(str(path), f"the folder {parent} is not writable")


def _check_precision(precision: str | None) -> None:
    """``--precision``: unset (as recorded), or one of the precisions a param takes."""
    from gmner.core.param_spec import PRECISION

    if precision is not None:
        PRECISION.check(precision, "--precision")


def _stage_command(name: str):
    def command(params: Path = ParamsOpt, overrides: Optional[list[str]] = SetOpt) -> None:
        run(name, params, overrides)

    return command


for _name, _stage in STAGES.items():
    if _name != "evaluate":
        app.command(_name, help=_stage.help)(_stage_command(_name))


@app.command(help=STAGES["evaluate"].help)
def evaluate(
    model: str = typer.Option("tagger", help="model folder name under models/"),
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    run("evaluate", params, overrides, model=model)


@app.command(help="Predict entities (and regions) for a JSONL of tweets: {text | tokens, image?, id?} per line.")
def predict(
    model_dir: Path = typer.Argument(..., help="a trained model folder, e.g. models/tagger"),
    input_path: Path = typer.Argument(..., help="input JSONL"),
    output_path: Path = typer.Argument(..., help="output JSONL"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps, or auto"),
    draw: Optional[Path] = typer.Option(
        None, "--draw", help="also draw each line's image with its entities' boxes into DIR/<id>.png", metavar="DIR"
    ),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="where the vision results of the images are cached; default: ./.cache if it exists, "
        "else ~/.cache/gmner", metavar="DIR"),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 for the vision models (default: as "
                                            "trained) and the model"),
    batch_size: int = typer.Option(64, min=1, help="tweets per model batch"),
) -> None:
    from gmner.core.params import resolve_device
    from gmner.models.predictor import model_folder
    from gmner.predict import predict_jsonl

    resolve_device(device, "--device")
    _check_precision(precision)
    model_folder(model_dir)
    _check_writable(output_path)
    if draw is not None:
        _check_writable(draw, folder=True)
    predict_jsonl(model_dir, input_path, output_path, device=device, draw_dir=draw, cache=cache, precision=precision,
                  batch_size=batch_size)


@app.command(help="Serve a model folder over HTTP: POST /predict (JSON or multipart), GET / (a page), GET /health.")
def serve(
    model_dir: Path = typer.Argument(..., help="a trained model folder, e.g. models/grounded"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=0, max=65535),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps, or auto"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="vision results cache (as for predict)", metavar="DIR"),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (as for predict)"),
    max_request_bytes: int = typer.Option(16 << 20, min=1, help="largest request body"),
    max_image_pixels: int = typer.Option(40_000_000, min=1, help="largest image, width x height"),
    max_text_chars: int = typer.Option(4000, min=1, help="longest tweet text"),
) -> None:
    from gmner.serve import Limits
    from gmner.serve import serve as run_server

    _check_precision(precision)
    run_server(model_dir, host, port, Limits(max_request_bytes, max_image_pixels, max_text_chars), device=device,
               cache=cache, precision=precision)


@app.command(help="Write a model folder's README.md (a Hugging Face model card), with the evaluate stage's metrics.")
def card(
    model_dir: Path = typer.Argument(..., help="a trained model folder, e.g. models/grounded"),
    metrics: Optional[Path] = typer.Option(None, help="the evaluate stage's metrics JSON; default: "
                                           "metrics/<folder name>.json when it exists"),
) -> None:
    import json

    from gmner.models.card import write_card
    from gmner.models.predictor import model_folder

    model_folder(model_dir)
    metrics = metrics or Path("metrics") / f"{model_dir.name}.json"
    typer.echo(write_card(model_dir, metrics=json.loads(metrics.read_text()) if metrics.is_file() else None))


@app.command(help="Ablation tables in Markdown (mean ± std over seeds) from `dvc exp show --json` output.")
def ablations(
    input_path: Optional[str] = typer.Argument(
        None, metavar="[INPUT]", help="the JSON of `dvc exp show --json`; - reads stdin; none: runs it here"
    ),
    tables: Optional[list[str]] = typer.Option(
        None, "--table", "-t",
        help="table to build (repeatable); default: the --spec file's, else every built-in one",
    ),
    spec: Optional[Path] = typer.Option(None, "--spec", help="YAML of tables adding to or replacing the built-in ones"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the Markdown here instead of stdout"),
) -> None:
    from gmner.evaluation.ablations import write_ablations

    write_ablations(input_path, tables, spec, out)


@app.command(
    "exp-run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="`dvc exp run` with every param a config file sets (e.g. configs/twitter2017.yaml) as -S overrides; "
    "further arguments go to dvc as they are (stage names, --queue, -S ...).",
)
def exp_run(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML of params.yaml keys and their values"),
    params: Path = ParamsOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc command instead of running it"),
) -> None:
    import shlex
    import subprocess
    import sys

    from gmner.core.params import config_overrides

    overrides = config_overrides(config, params)
    command = [sys.executable, "-m", "dvc", "exp", "run", *(a for o in overrides for a in ("-S", o)), *ctx.args]
    if dry_run:
        typer.echo(shlex.join(["dvc", *command[3:]]))
        return
    raise SystemExit(subprocess.call(command))


def main() -> None:
    """Console entry point: bad input ends with its location on one line, not a traceback."""
    report_user_errors(app)


if __name__ == "__main__":
    main()
