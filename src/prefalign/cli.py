"""The `prefalign` command: train, eval, export, config, init, demo (and method-specific verbs). Every user
error is one `error:` line and exit code 2.

This module imports only typer at start: the runner (torch, transformers, accelerate) is imported by the
commands that use it, so `prefalign --help` answers at once."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from prefalign import __version__
from prefalign.core.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Align generative models to preferences.",
)

# the names of runner.METHODS (tests/test_cli.py checks they agree), kept here so that --help needs no torch
METHODS = ("dpo", "mpo", "em_dpo", "pfm", "diffusion_dpo", "sspo")
# demo name -> module exposing run(out_dir, quick, seeds) -> summary
DEMOS = {
    "dpo": "prefalign.demos.dpo",
    "mpo": "prefalign.demos.mpo",
    "em-dpo": "prefalign.demos.em_dpo",
    "pfm": "prefalign.demos.pfm",
    "sspo": "prefalign.demos.sspo",
    "diffusion": "prefalign.demos.diffusion",
}


def _runner():
    """The runner, imported on first use (it loads torch, transformers and accelerate: seconds)."""
    from prefalign import runner
    from prefalign.core import console

    console.quiet_library_noise()
    return runner


def _say_threads() -> None:
    from prefalign.core import console

    line = console.threads_for_tiny_models()
    if line and console.is_main_process():
        typer.echo(line)


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


KEYS_HELP = (
    "Every key of a method's config, with its type, default and meaning: `prefalign config METHOD`; a "
    f"commented starter config: `prefalign init METHOD > my.yaml` (methods: {', '.join(METHODS)})."
)


@app.command(epilog=KEYS_HELP)
def train(
    config: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/dpo_reviews.yaml")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.sub=value (repeatable)")
    ] = None,
):
    """Train any method from a YAML config (`method: dpo|mpo|em_dpo|pfm|diffusion_dpo|sspo`).

    The console shows what will run (model, data, split, device, steps), a line of metrics every train.log_every steps (a progress bar too, on a terminal) and where everything was written."""
    try:
        runner = _runner()
        cfg = runner.load_config(config, set_)
        if str(getattr(cfg.model, "name_or_path", "")).startswith("world:"):
            _say_threads()
        result = runner.run(cfg)
    except UserError as e:
        _fail(str(e))
    from prefalign.core import console

    if console.is_main_process():  # under accelerate launch / torchrun every process gets here
        typer.echo(f"run directory: {result.run_dir}")


def _method(name: str) -> str:
    method = name.replace("-", "_")
    if method not in METHODS:
        _fail(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return method


# what `prefalign init` writes for keys a user must fill in: {key: (placeholder, comment)}
LM_REQUIRED = {
    "model.name_or_path": (
        "./my-model",
        "a local model folder, a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct; downloads) or world:reviews",
    ),
    "data.train": (
        "my_prefs.jsonl",
        "preference data (.jsonl/.json/.parquet/.csv, datasets folder, hub name)",
    ),
}
REQUIRED = {
    "dpo": LM_REQUIRED,
    "mpo": LM_REQUIRED,
    "em_dpo": LM_REQUIRED,
    "pfm": {"data.train": ("pairs.npz", "arrays chosen, rejected [N, ...] (+ optional context)")},
    "diffusion_dpo": {
        "model.name_or_path": (
            "world:digits",
            "an SD-1.x/2.x or SDXL pipeline (folder or hub id), a folder with unet/ + scheduler/, or world:NAME",
        ),
        "data.train": (
            "world:digits-judge",
            "Pick-a-Pic-style pairs (.parquet/.csv/folder/datasets), a pairs .npz, or world:NAME",
        ),
    },
    "sspo": {
        "model.name_or_path": (
            "world:digits",
            "an SD-1.x/2.x or SDXL pipeline (folder or hub id), a folder with unet/ + scheduler/, or world:NAME",
        ),
        "data.train": (
            "world:digits-judge",
            "winners (caption + image) or Pick-a-Pic-style pairs, a .npz, or world:NAME",
        ),
    },
}


@app.command("config", epilog=KEYS_HELP)
def config_(method: Annotated[str, typer.Argument(help=f"one of: {', '.join(METHODS)}")]):
    """Print every key of METHOD's config: dotted key, type, default, meaning."""
    method = _method(method)
    from prefalign.core.config import loss_options
    from prefalign.core.config_doc import key_table

    module = _runner().method_module(method)
    typer.echo(
        f"{method}: every config key (set it in the YAML, or with --set key=value)\n"
        "key, type, default (null: unset), meaning\n"
    )
    typer.echo(key_table(module.Config, skip=set(getattr(module, "RENAMES", {}))))
    losses = getattr(module, "LOSSES", {})
    if losses:
        typer.echo("\noptions each loss.name takes (unset: the default shown):")
        for name, fn in losses.items():
            options = ", ".join(f"{k} {v}" for k, v in loss_options(fn).items()) or "none"
            typer.echo(f"  {name}: {options}")


@app.command()
def init(method: Annotated[str, typer.Argument(help=f"one of: {', '.join(METHODS)}")]):
    """Print a commented starter config for METHOD (every key at its default): prefalign init dpo > my.yaml"""
    method = _method(method)
    header = (
        f"prefalign {method} config: every key at its default, with its meaning.\n"
        "Fill in the REQUIRED keys, delete what you do not change, then: prefalign train THIS.yaml\n"
        f"Types and defaults: prefalign config {method}"
    )
    from prefalign.core.config_doc import starter_yaml

    module = _runner().method_module(method)
    text = starter_yaml(module.Config, header, REQUIRED[method], skip=set(getattr(module, "RENAMES", {})))
    typer.echo(text, nl=False)


@app.command()
def demo(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(DEMOS)}, all")] = "dpo",
    quick: Annotated[bool, typer.Option("--quick", help="a ~3 minute version (1 seed, fewer steps)")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="output directory")] = None,
    seeds: Annotated[
        int, typer.Option(help="number of seeds; 0: 1 with --quick, else 3", show_default=False)
    ] = 0,
):
    """Build a world, train, evaluate against ground truth, write report.md + summary.json."""
    names = list(DEMOS) if name == "all" else [name]
    for demo_name in names:
        if demo_name not in DEMOS:
            _fail(f"unknown demo '{demo_name}'; choose one of: {', '.join(DEMOS)}, all")
    n_seeds = seeds or (1 if quick else 3)
    _say_threads()
    for demo_name in names:
        out_dir = out or Path("runs") / f"demo-{demo_name}{'-quick' if quick else ''}"
        if name == "all" and out is not None:
            out_dir = out / demo_name
        _runner()  # library noise quieted before the demo's imports
        try:
            from prefalign.core import extras

            extras.require("demos", f"prefalign demo {demo_name}")
            module = importlib.import_module(DEMOS[demo_name])
            module.run(Path(out_dir), quick=quick, seeds=list(range(n_seeds)))
        except UserError as e:
            _fail(str(e))
        typer.echo(
            f"{demo_name}: report {Path(out_dir) / 'report.md'}, summary {Path(out_dir) / 'summary.json'}"
        )


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prefalign train`")],
    data: Annotated[
        str | None, typer.Option(help="preference data to evaluate on (default: the run's held-out split)")
    ] = None,
    samples: Annotated[int, typer.Option(help="show N generated samples beside the reference's")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print eval.json instead of the summary")] = False,
):
    """Evaluate a trained run: held-out preference metrics (any --data), the world's ground truth when the
    run started in one, and samples -> RUN_DIR/eval.json + RUN_DIR/eval.md."""
    try:
        result = _runner().evaluate(run_dir, data=data, samples=samples)
    except UserError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    for note in result.get("notes", []):
        typer.echo(note)
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    from prefalign.core import console

    typer.echo(console.block("results", {k: console.number(v) for k, v in numbers.items()}))
    for sample in result.get("samples", []):
        typer.echo(
            f"\nprompt:    {sample['prompt']}\npolicy:    {sample['policy']}\nreference: {sample['reference']}"
        )
    typer.echo(f"\nwritten: {run_dir / 'eval.json'}, {run_dir / 'eval.md'}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prefalign train`")],
    out: Annotated[Path, typer.Argument(help="a new folder for the model")],
    merge_lora: Annotated[
        bool,
        typer.Option("--merge-lora", help="merge LoRA adapters into the base: a plain transformers model"),
    ] = False,
    step: Annotated[
        int | None, typer.Option(help="export checkpoints/step-N instead of final/ (dpo, mpo)")
    ] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option("--push-to-hub", help="then upload the folder to this hub repository (owner/name)"),
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="create the hub repository public (default: private)")
    ] = False,
    license: Annotated[str | None, typer.Option(help="the model card's license (e.g. apache-2.0)")] = None,
):
    """Write the run's model as a folder `from_pretrained` opens (with its model card, README.md); with
    --push-to-hub, upload it to the Hugging Face Hub (token: HF_TOKEN or `huggingface-cli login`)."""
    try:
        what = _runner().export(
            run_dir, out, merge_lora=merge_lora, step=step, license=license, push_to_hub=push_to_hub,
            private=not public,
        )  # fmt: skip
    except UserError as e:
        _fail(str(e))
    typer.echo(f"exported {what} to {out}")


@app.command("mpo-regdata")
def mpo_regdata(
    config: Annotated[Path, typer.Argument(help="an MPO recipe (method: mpo)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.sub=value (repeatable)")
    ] = None,
):
    """Sample the reference once on the training prompts: MPO's regularization set (resumable)."""
    try:
        cfg = _runner().load_config(config, set_)
        if cfg.method != "mpo":
            _fail(f"{config}: mpo-regdata needs a config with method: mpo")
        from prefalign.methods import mpo

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
        _runner().config_of(run_dir)
        from prefalign.methods.em_dpo.aggregate import aggregate_run

        result = aggregate_run(run_dir, n_prompts=prompts, n_samples=samples, solver=solver)
    except UserError as e:
        _fail(str(e))
    typer.echo(json.dumps(result, indent=2, default=float))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="prefalign")


if __name__ == "__main__":
    sys.exit(main())
