"""The `gmner` command: every pipeline stage, plus prediction on new tweets.

Stage commands run exactly what `dvc repro` runs (gmner.pipeline.run, as the scripts in stages/ do), with
optional `--set group.key=value` overrides of keys params.yaml has, for one-off runs outside DVC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gmner.pipeline import STAGES, report_user_errors, run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read")
SetOpt = typer.Option(None, "--set", help="override a param, e.g. --set train.lr=3e-5 (repeatable)")

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
    device: str = typer.Option("cpu", help="cpu, cuda, or auto"),
    draw: Optional[Path] = typer.Option(
        None, "--draw", help="also draw each line's image with its entities' boxes into DIR/<id>.png", metavar="DIR"
    ),
) -> None:
    from gmner.predict import predict_jsonl

    predict_jsonl(model_dir, input_path, output_path, device=device, draw_dir=draw)


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

    try:
        overrides = config_overrides(config, params)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
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
