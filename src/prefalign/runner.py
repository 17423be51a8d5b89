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
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefalign.core import console, extras, packing
from prefalign.core.checkpoint import checkpoints
from prefalign.core.config import apply_overrides, apply_renames, build, load_yaml, loss_options, to_dict
from prefalign.core.data_mix import check_sources_exist
from prefalign.core.errors import ConfigError
from prefalign.core.export import export_checkpoint, export_final, record_base_model
from prefalign.core.hub import push_folder
from prefalign.core.report import eval_markdown, model_card, write_summary
from prefalign.core.train import FitResult, fit, make_accelerator, total_steps, unwrap

logger = logging.getLogger(__name__)

METHODS = {
    "dpo": "prefalign.methods.dpo",
    "mpo": "prefalign.methods.mpo",
    "em_dpo": "prefalign.methods.em_dpo.em",
    "pfm": "prefalign.methods.pfm",
    "diffusion_dpo": "prefalign.methods.diffusion_dpo",
    "sspo": "prefalign.methods.sspo",
}
# methods whose modules import an optional extra's packages (core/extras.py)
METHOD_EXTRAS = {"diffusion_dpo": "diffusion", "sspo": "diffusion"}
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
    if name in METHOD_EXTRAS:
        extras.require(METHOD_EXTRAS[name], f"method '{name}'")
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
    """Read CONFIG.yaml (+ `key=value` overrides) into its method's Config; every key is checked here.

    A recipe's loss options belong to its loss: after `--set loss.name=sft` on a DPO recipe, the file's
    `loss.beta` (which sft does not take) is dropped with one line saying so. An option the chosen loss does
    not take that was given with --set stays an error."""
    data = load_yaml(path)
    merged = apply_overrides(data, overrides)
    try:
        return build_config(merged, str(path))
    except ConfigError as e:
        dropped = getattr(e, "options_not_taken", {})
        set_keys = {item.split("=", 1)[0].strip() for item in overrides or []}
        renamed = "loss.name" in set_keys and (data.get("loss") or {}).get("name") != merged["loss"].get(
            "name"
        )
        if not dropped or not renamed or any(f"loss.{key}" in set_keys for key in dropped):
            raise
    merged["loss"] = {k: v for k, v in merged["loss"].items() if k not in dropped}
    shown = ", ".join(f"loss.{k} {v}" for k, v in dropped.items())
    logger.warning(
        f"note: --set loss.name={merged['loss']['name']}: {path}'s {shown} left out ({merged['loss']['name']} "
        f"does not take {'them' if len(dropped) > 1 else 'it'})"
    )
    return build_config(merged, str(path))


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
    note = schedule_note(saved, now)
    if note:
        logger.warning(note)


def schedule_note(saved: dict, now: dict) -> str | None:
    """A resumed run whose length changed (train.max_steps / train.epochs): its learning-rate schedule is
    rebuilt for the new length from the next step on, said in one line (silently, the two schedules join)."""
    changed = [k for k in ("train.max_steps", "train.epochs") if saved.get(k) != now.get(k)]
    if not changed:
        return None
    what = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in changed)
    return (
        f"note: resuming with {what}: the {now.get('train.lr_scheduler')} learning-rate schedule (warmup "
        f"{now.get('train.warmup_steps')}) is rebuilt for the new length and continues from the checkpoint's "
        "step, so the steps already taken followed the old one; set train.resume: false to train from scratch"
    )


def check_output_dir(run_dir: Path) -> None:
    """`train.output_dir` is a folder this process can write (made if missing): a config error naming the key
    otherwise, before any work."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"config key 'train.output_dir': {run_dir} is a file, not a folder; choose another output_dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"config key 'train.output_dir': cannot write to {run_dir} ({e.strerror or e}); choose a folder "
            "you can write to"
        ) from None


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
    talk = cfg.train.progress
    console.quiet_library_noise()
    try:
        check_output_dir(run_dir)
        accelerator = make_accelerator(cfg.train)
        check_resumable(run_dir, cfg)
        check_sources_exist(cfg.data)
        if accelerator.is_main_process:
            _write_config(run_dir, cfg)
            _record_world(run_dir, cfg)
        ctx = RunContext(cfg, run_dir, accelerator)
        with packing.announce_later():  # the start block names the attention path
            job = module.setup(cfg, ctx, **inputs)
    except BaseException:
        if created and console.is_main_process():  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if talk:
        console.say(start_block(cfg, job, accelerator, run_dir))
    found = checkpoints(run_dir) if cfg.train.resume else []
    resumed_at = int(found[-1].name.split("-")[1]) if found else 0
    started = time.time()
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
            final = _save_final(job, model, run_dir)
            record_base_model(final, cfg.model.name_or_path if hasattr(cfg.model, "name_or_path") else "")
            (final / "README.md").write_text(model_card(to_dict(cfg), summary, final))
        write_summary(run_dir, summary)
        if (
            cfg.train.push_to_hub and job.save is not None
        ):  # the exported folder, as `prefalign export` writes it
            train = cfg.train
            pushed = export(
                run_dir, run_dir / "hub", license=train.hub_license, push_to_hub=train.push_to_hub,
                private=train.hub_private,
            )  # fmt: skip
            if talk:
                console.say(f"hub: {pushed}")
        if talk:
            options = inspect.signature(module.evaluate_run).parameters
            reused = resumed_at >= summary.get("steps", 0) > 0 and job.train is None
            console.say(closing_block(summary, run_dir, time.time() - started, options, reused))
    accelerator.wait_for_everyone()
    return RunResult(run_dir, model, result.history, summary)


def _sources_of(cfg) -> list[str]:
    """The data files of an LM config's `data.train` (one or several sources)."""
    train = getattr(getattr(cfg, "data", None), "train", None)
    items = train if isinstance(train, list) else [train]
    paths = [item if isinstance(item, str) else getattr(item, "path", None) for item in items]
    return [p for p in paths if isinstance(p, str) and p]


def _record_world(run_dir: Path, cfg) -> None:
    """Copy the `world.json` found beside the training data (written by a demo: which world and annotator
    types made the data) into the run, so `prefalign eval` reports ground truth for the right type."""
    found = [Path(p).parent / "world.json" for p in _sources_of(cfg)]
    texts = {f.read_text() for f in found if f.is_file()}
    if len(texts) == 1 and len([f for f in found if f.is_file()]) == len(found):
        (run_dir / "world.json").write_text(texts.pop())


def start_block(cfg, job, accelerator, run_dir: Path) -> str:
    """What will run: method, model and its size, data, split, device, precision, packing, steps."""
    model = unwrap(job.model)
    n_all, n_trainable = console.count_parameters(model)
    lora = getattr(getattr(cfg.model, "lora", None), "enabled", False)
    first = next(iter(model.parameters()), None)
    dtype = str(first.dtype).removeprefix("torch.") if first is not None else "?"
    name = getattr(cfg.model, "name_or_path", "") or type(model).__name__
    what = f"{console.count(n_all)} parameters, {console.count(n_trainable)} trainable"
    if lora:
        what += f" (LoRA r {cfg.model.lora.r}, alpha {cfg.model.lora.alpha})"
    loss_text = _loss_text(getattr(cfg, "loss", None), getattr(method_module(cfg.method), "LOSSES", {}))
    t = cfg.train
    n_proc = accelerator.num_processes
    rows = {"model": f"{name}: {what}; weights {dtype}", "loss": loss_text, **job.info}
    rows["device"] = (
        f"{accelerator.device.type} ({n_proc} process{'es' if n_proc > 1 else ''}), "
        f"mixed precision {accelerator.mixed_precision}"
    )
    if job.dataset is not None:
        steps = total_steps(t, len(job.dataset), n_proc)
        per_step = t.batch_size * t.grad_accum * n_proc
        # as metrics.jsonl counts them: micro-batches over micro-batches per epoch (the last one may be short)
        epochs = steps * t.grad_accum * n_proc / math.ceil(len(job.dataset) / t.batch_size)
        rows["steps"] = (
            f"{steps} optimizer steps x {per_step} records (batch {t.batch_size} x grad_accum {t.grad_accum} "
            f"x {n_proc} process{'es' if n_proc > 1 else ''}) = {epochs:.3g} epochs of {len(job.dataset)}; "
            f"lr {console.number(t.learning_rate)} {t.lr_scheduler}, warmup {t.warmup_steps}"
        )
    found = checkpoints(run_dir) if t.resume else []
    if found:
        rows["resume"] = f"from {found[-1]}"
    logging = [f"every {_steps(t.log_every)} -> {run_dir / 'metrics.jsonl'}"]
    if job.evaluate is not None or job.train is not None:  # a method's own loop evaluates as it goes
        logging.append(
            "eval " + (f"every {_steps(t.eval_every)} and at the end" if t.eval_every else "at the end")
        )
    logging.append(
        "checkpoints " + (f"every {_steps(t.save_every)} and at the end" if t.save_every else "at the end")
    )
    if t.report_to:
        logging.append(f"trackers {', '.join(t.report_to)}")
    rows["logging"] = "; ".join(logging)
    return console.block(f"prefalign: {cfg.method} -> {run_dir}", rows)


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def _loss_text(section, losses: dict) -> str:
    """`dpo (beta 0.1, label_smoothing 0)`: the loss and every option it runs with (given or default)."""
    if section is None:
        return ""
    given = {k: v for k, v in dataclasses.asdict(section).items() if k != "name" and v is not None}
    fn = losses.get(section.name)
    options = {**(loss_options(fn) if fn is not None else {}), **given}
    shown = ", ".join(f"{k} {console.number(v) if isinstance(v, float) else v}" for k, v in options.items())
    return section.name + (f" ({shown})" if shown else "")


def closing_block(summary: dict, run_dir: Path, seconds: float, eval_options=(), reused=False) -> str:
    """The end of a run: last training and eval metrics, where everything was written, what to run next
    (`eval_options`: the options the method's `prefalign eval` takes; `reused`: the run directory held a
    finished run, so nothing was trained)."""
    final = run_dir / "final"
    rows = {}
    if summary.get("final"):
        rows["train"] = "  ".join(
            f"{k} {console.number(v)}" for k, v in console.metric_items(summary["final"])
        )
    if summary.get("eval"):
        evals = console.metric_items({f"eval/{k}": v for k, v in summary["eval"].items()}, "eval/")
        rows["eval"] = "  ".join(f"{k} {console.number(v)}" for k, v in evals)
    rows["model"] = f"{final}/  (model card: {final / 'README.md'})" if final.is_dir() else None
    rows["files"] = f"{run_dir}/  metrics.jsonl, summary.json, config.yaml, checkpoints/"
    samples = " --samples 4" if "samples" in eval_options else ""
    rows["next"] = f"prefalign eval {run_dir}{samples};  prefalign export {run_dir} OUT_DIR"
    title = f"done: {_steps(summary.get('steps', 0))} in {seconds:.1f} s"
    if reused:
        title = (
            f"done: {run_dir} already held this finished run ({_steps(summary.get('steps', 0))}); nothing was "
            "trained (train.resume: false trains it again)"
        )
    return console.block(title, rows)


def evaluate(run_dir: str | Path, **options) -> dict:
    """`prefalign eval RUN_DIR [--data FILE] [--samples N]`: the method's evaluation of a finished run,
    written to RUN/eval.json and RUN/eval.md (and into final/README.md). Options a method's
    `evaluate_run` takes: `data` (held-out preference metrics on any data file instead of the run's eval
    split), `samples` (that many generated samples beside the reference's)."""
    run_dir = Path(run_dir)
    cfg = config_of(run_dir)
    if not (run_dir / "final").is_dir():
        raise ConfigError(f"{run_dir} has no final/ (the run did not finish)")
    evaluate_run = method_module(cfg.method).evaluate_run
    takes = inspect.signature(evaluate_run).parameters
    given = {k: v for k, v in options.items() if v}
    for key in given:
        if key not in takes:
            raise ConfigError(f"eval: option --{key} is not available for method {cfg.method}")
    result = evaluate_run(run_dir, cfg, **given)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (run_dir / "eval.md").write_text(eval_markdown(run_dir, cfg.method, result))
    card = run_dir / "final" / "README.md"
    if card.is_file():
        summary = (
            json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        )
        card.write_text(model_card(to_dict(cfg), summary, run_dir / "final", evaluation=result))
    return result


def export(
    run_dir: str | Path,
    out: str | Path,
    merge_lora: bool = False,
    step: int | None = None,
    *,
    license: str | None = None,
    push_to_hub: str | None = None,
    private: bool = True,
) -> str:
    """`prefalign export RUN_DIR OUT [--merge-lora] [--step N] [--push-to-hub REPO]`: the run's model (final/,
    or checkpoint N of a dpo/mpo run) as a folder `from_pretrained` opens, with its model card (hub metadata:
    `license` among it); see `core/export.py`. With `push_to_hub`, the folder is then uploaded to that hub
    repository (`core/hub.py`; created `private` when missing). Returns what was done."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = config_of(run_dir)
    if step is None:
        what = export_final(run_dir / "final", cfg.model, out, merge_lora)
    else:
        if cfg.method not in ("dpo", "mpo"):
            raise ConfigError(
                f"export --step: checkpoints of {cfg.method} runs are for resuming; export final/"
            )
        checkpoint = run_dir / "checkpoints" / f"step-{step}"
        if not checkpoint.is_dir():
            found = ", ".join(p.name for p in checkpoints(run_dir)) or "none"
            raise ConfigError(f"export --step {step}: no {checkpoint} (checkpoints: {found})")
        what = export_checkpoint(checkpoint, cfg.model, cfg.train.seed, out, merge_lora)
    summary_path, eval_path = run_dir / "summary.json", run_dir / "eval.json"
    summary = (
        json.loads(summary_path.read_text()) if summary_path.is_file() and step is None else {"steps": step}
    )
    evaluation = json.loads(eval_path.read_text()) if eval_path.is_file() and step is None else None
    (out / "README.md").write_text(model_card(to_dict(cfg), summary, out, evaluation, license=license))
    if push_to_hub:
        what += f", pushed to {push_to_hub} ({push_folder(out, push_to_hub, private=private)})"
    return what


def replace_train(cfg, **changes):
    """A copy of `cfg` with `train.<key>` changed (demos run one config under several seeds and folders)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
