"""The runner: one path for every method, from a config to a finished run directory.

    result = run(cfg)                  # cfg: a method's Config (prefalign.runner.load_config reads YAML)
    result.run_dir, result.model, result.history, result.summary

For every method the runner owns the run directory — `config.yaml` (resolved, always with `method`), the
check that a resumed run has the same config, `final/` (written atomically), `summary.json` — the device
(accelerate), the training loop (`core.train.fit`, with checkpoints and exact resume), and evaluation
(`evaluate(run_dir)`, what `prefalign eval` calls). A method module supplies only what is its own:

    Config          its dataclass (sections method, model, data, loss, train, + its own)
    RENAMES         old config keys -> new ones (accepted with a one-line deprecation message)
    setup(cfg, ctx, **inputs) -> core.train.Job     data, model, reference, step, evaluation, save
    evaluate_run(run_dir, cfg) -> dict               held-out metrics and, in a world, ground truth
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefalign.core.checkpoint import checkpoints
from prefalign.core.config import apply_overrides, apply_renames, build, load_yaml, to_dict
from prefalign.core.errors import ConfigError
from prefalign.core.report import write_summary
from prefalign.core.train import FitResult, fit, make_accelerator, unwrap

METHODS = {
    "dpo": "prefalign.methods.dpo",
    "mpo": "prefalign.methods.mpo",
    "em_dpo": "prefalign.methods.em_dpo.em",
    "pfm": "prefalign.methods.pfm",
    "diffusion_dpo": "prefalign.methods.diffusion_dpo",
    "sspo": "prefalign.methods.sspo",
}
# keys that may change between a run and its resumption (how long, how often, how loud)
RESUMABLE_CHANGES = {
    "train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.progress", "train.report_to", "train.resume",
}  # fmt: skip


@dataclass
class RunResult:
    run_dir: Path
    model: Any  # the trained model (bare, unwrapped)
    history: list[dict]  # the lines of metrics.jsonl
    summary: dict  # what summary.json holds


@dataclass
class RunContext:
    """What a method's `setup` and custom loops get from the runner."""

    cfg: Any
    run_dir: Path
    accelerator: Any


def method_module(name: str):
    if name not in METHODS:
        raise ConfigError(
            f"config key 'method': unknown method '{name}'; choose one of: {', '.join(METHODS)}"
        )
    return importlib.import_module(METHODS[name])


def build_config(data: dict, where: str = "config"):
    """A method's Config from a mapping with a `method:` key (old keys renamed, with a message)."""
    data = dict(data)
    method = data.pop("method", None)
    if method is None:
        raise ConfigError(f"{where}: missing 'method:' key (one of {', '.join(METHODS)})")
    module = method_module(str(method))
    data = apply_renames(data, getattr(module, "RENAMES", {}), where)
    return build(module.Config, data)


def load_config(path: str | Path, overrides: list[str] | None = None):
    """Read CONFIG.yaml (+ `key=value` overrides) into its method's Config; every key is checked here."""
    return build_config(apply_overrides(load_yaml(path), overrides), str(path))


def config_of(run_dir: str | Path):
    """The Config a run directory was made with (its config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return build_config(load_yaml(path), str(path))


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resumable(run_dir: Path, cfg) -> None:
    """A run directory with checkpoints is resumed only under the config it was written with."""
    saved_path = run_dir / "config.yaml"
    if (
        not cfg.train.resume
        or not saved_path.is_file()
        or not (checkpoints(run_dir) or (run_dir / "em").is_dir())
    ):
        return
    saved, now = _flat(yaml.safe_load(saved_path.read_text()) or {}), _flat(to_dict(cfg))
    differ = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES
    )
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(
            f"{run_dir} holds a run made with another config: {shown}{more}. To start over there, set "
            "train.resume: false (its checkpoints are then ignored and overwritten); or choose another "
            "train.output_dir"
        )


def _write_config(run_dir: Path, cfg) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _save_final(job, model, run_dir: Path) -> Path:
    """`final/` written to a temp folder and renamed into place: never half a model."""
    final, tmp = run_dir / "final", run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    job.save(model, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _summary(cfg, job, history: list[dict]) -> dict:
    train_logs = [h for h in history if "loss" in h and not any(k.startswith("eval/") for k in h)]
    eval_logs = [h for h in history if any(k.startswith("eval/") for k in h)]
    summary = {"method": cfg.method, "steps": train_logs[-1]["step"] if train_logs else 0}
    if train_logs:
        summary["final"] = {
            k: v for k, v in train_logs[-1].items() if k != "step" and not isinstance(v, list)
        }
    if eval_logs:
        summary["eval"] = {
            k.removeprefix("eval/"): v for k, v in eval_logs[-1].items() if k.startswith("eval/")
        }
    if job.summarize is not None:
        summary.update(job.summarize(history))
    return summary


def run(cfg, **inputs) -> RunResult:
    """Train `cfg` (any method's Config) into `cfg.train.output_dir`. `inputs` are the method's in-memory
    alternatives to its config: `records`, `eval_records`, `model`, `tokenizer`, `evaluate_fn`, ... A model
    passed in is trained in place (pass a copy to keep the original)."""
    module = method_module(cfg.method)
    run_dir = Path(cfg.train.output_dir)
    created = not run_dir.exists()
    accelerator = make_accelerator(cfg.train)
    try:
        check_resumable(run_dir, cfg)
        if accelerator.is_main_process:
            _write_config(run_dir, cfg)
        ctx = RunContext(cfg, run_dir, accelerator)
        job = module.setup(cfg, ctx, **inputs)
    except BaseException:
        if created and accelerator.is_main_process:  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if job.train is not None:
        result: FitResult = job.train(ctx)
    else:
        result = fit(
            job.model, job.dataset, job.collate, job.step, cfg.train,
            evaluate_fn=job.evaluate, stateful=job.stateful, accelerator=accelerator, desc=job.desc,
        )  # fmt: skip
    model = unwrap(result.model)
    summary = _summary(cfg, job, result.history)
    if accelerator.is_main_process:
        if job.save is not None:
            _save_final(job, model, run_dir)
        write_summary(run_dir, summary)
    accelerator.wait_for_everyone()
    return RunResult(run_dir, model, result.history, summary)


def evaluate(run_dir: str | Path, **options) -> dict:
    """`prefalign eval RUN_DIR`: the method's evaluation of a finished run, also written to RUN/eval.json."""
    run_dir = Path(run_dir)
    cfg = config_of(run_dir)
    if not (run_dir / "final").is_dir():
        raise ConfigError(f"{run_dir} has no final/ (the run did not finish)")
    result = method_module(cfg.method).evaluate_run(run_dir, cfg, **options)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def replace_train(cfg, **changes):
    """A copy of `cfg` with `train.<key>` changed (demos run one config under several seeds and folders)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
