"""The `prefalign` command: train, demo, eval (and method-specific verbs). Every user error is one
`error:` line and exit code 2."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from prefalign import __version__, runner
from prefalign.core.errors import UserError
from prefalign.methods import mpo
from prefalign.methods.em_dpo.aggregate import aggregate_run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Align generative models to preferences.",
)

METHODS = runner.METHODS
# demo name -> module exposing run(out_dir, quick, seeds) -> summary
DEMOS = {
    "dpo": "prefalign.demos.dpo",
    "mpo": "prefalign.demos.mpo",
    "em-dpo": "prefalign.demos.em_dpo",
    "pfm": "prefalign.demos.pfm",
    "sspo": "prefalign.demos.sspo",
    "diffusion": "prefalign.demos.diffusion",
}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefalign {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
):
    """Align generative models to preferences."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/dpo_reviews.yaml")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.sub=value (repeatable)")
    ] = None,
):
    """Train any method from a YAML config (`method: dpo|mpo|em_dpo|pfm|diffusion_dpo|sspo`)."""
    try:
        result = runner.run(runner.load_config(config, set_))
    except UserError as e:
        _fail(str(e))
    typer.echo(f"run directory: {result.run_dir}")


@app.command()
def demo(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(DEMOS)}, all")] = "dpo",
    quick: Annotated[bool, typer.Option("--quick", help="a ~3 minute version (1 seed, fewer steps)")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="output directory")] = None,
    seeds: Annotated[int, typer.Option(help="number of seeds (default: 1 with --quick, else 3)")] = 0,
):
    """Build a world, train, evaluate against ground truth, write report.md + summary.json."""
    names = list(DEMOS) if name == "all" else [name]
    for demo_name in names:
        if demo_name not in DEMOS:
            _fail(f"unknown demo '{demo_name}'; choose one of: {', '.join(DEMOS)}, all")
    n_seeds = seeds or (1 if quick else 3)
    for demo_name in names:
        out_dir = out or Path("runs") / f"demo-{demo_name}{'-quick' if quick else ''}"
        if name == "all" and out is not None:
            out_dir = out / demo_name
        module = importlib.import_module(DEMOS[demo_name])
        try:
            module.run(Path(out_dir), quick=quick, seeds=list(range(n_seeds)))
        except UserError as e:
            _fail(str(e))
        typer.echo(
            f"{demo_name}: report {Path(out_dir) / 'report.md'}, summary {Path(out_dir) / 'summary.json'}"
        )


@app.command("eval")
def eval_(run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prefalign train`")]):
    """Evaluate a trained run (held-out data; ground truth in a world) -> RUN_DIR/eval.json, printed."""
    try:
        result = runner.evaluate(run_dir)
    except UserError as e:
        _fail(str(e))
    typer.echo(json.dumps(result, indent=2, default=float))


@app.command("mpo-regdata")
def mpo_regdata(
    config: Annotated[Path, typer.Argument(help="an MPO recipe (method: mpo)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.sub=value (repeatable)")
    ] = None,
):
    """Sample the reference once on the training prompts: MPO's regularization set (resumable)."""
    try:
        cfg = runner.load_config(config, set_)
        if cfg.method != "mpo":
            _fail(f"{config}: mpo-regdata needs a config with method: mpo")
        path = mpo.make_regularization_data(cfg)
    except UserError as e:
        _fail(str(e))
    typer.echo(f"regularization data: {path}")


@app.command()
def aggregate(
    run_dir: Annotated[Path, typer.Argument(help="an EM-DPO run directory")],
    prompts: Annotated[int, typer.Option(help="prompts used for cross-evaluation")] = 64,
    samples: Annotated[int, typer.Option(help="samples per prompt and type")] = 4,
    solver: Annotated[str, typer.Option(help="omw (optimistic multiplicative weights) or lp")] = "omw",
):
    """Min-max-regret aggregation of an EM-DPO mixture into one fair policy (RUN_DIR/mixture)."""
    try:
        runner.config_of(run_dir)
        result = aggregate_run(run_dir, n_prompts=prompts, n_samples=samples, solver=solver)
    except UserError as e:
        _fail(str(e))
    typer.echo(json.dumps(result, indent=2, default=float))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="prefalign")


if __name__ == "__main__":
    sys.exit(main())
