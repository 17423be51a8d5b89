"""The one training loop, shared by every method (LM, flow, diffusion).

`fit(model, dataset, collate_fn, step_fn, cfg)` runs AdamW with gradient accumulation, warmup + schedule,
gradient clipping, metrics in `metrics.jsonl` (TRL names), atomic checkpoints and exact resume, through
`accelerate` (one process on CPU, DDP/FSDP/DeepSpeed on GPUs via `accelerate launch`).

Data order is a pure function of (seed, micro-batch counter): micro-batch k of the run is slice k of a
per-epoch permutation, and with P processes micro-batch k goes to process k % P. So a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would, and P processes with accumulation A see
the same batches as one process with accumulation P·A.

`Job` is what a method hands the runner (`prefalign.runner`): the model, data, step and evaluation of one
run, and how to save the trained model.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, extract_model_from_parallel, send_to_device, set_seed
from transformers import get_scheduler

from prefalign.core import console
from prefalign.core.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from prefalign.core.errors import ConfigError, NonFiniteLossError
from prefalign.core.metrics import MetricsLog
from prefalign.core.packing import checkpoint_contexts

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"  # the run directory: config.yaml, metrics.jsonl, checkpoints/, final/
    seed: int = 0  # data order, LoRA init, dropout and sampling all follow from it
    max_steps: int = 100  # optimizer steps; `epochs` overrides it when set
    epochs: float | None = None  # passes over the training records (fractions allowed); sets the step count
    batch_size: int = 8  # records per micro-batch per process
    grad_accum: int = (
        1  # micro-batches per optimizer step (records per step = batch_size x grad_accum x processes)
    )
    eval_batch_size: int = 16  # records per batch in evaluation and reference precompute
    learning_rate: float = 5e-5  # peak AdamW learning rate (after warmup)
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate over these optimizer steps
    lr_scheduler: str = "cosine"  # any transformers.get_scheduler name: linear, cosine, constant, ...
    max_grad_norm: float = 1.0  # 0 disables clipping
    # autocast of the forward pass; weights keep model.dtype (GPU: float32 weights + bf16; CPU: no)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    shuffle: bool = True  # a new seeded order of the records every epoch (false: file order)
    log_every: int = 10  # optimizer steps per line in metrics.jsonl and on the console
    eval_every: int = 0  # 0: evaluate only at the end (when the method has an evaluation)
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir/checkpoints/
    resume: bool = True  # continue from the newest checkpoint in output_dir, if any
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, mlflow, ...
    progress: bool = True  # console output: what will run, a metrics line every log_every, a summary
    # a hub repository (owner/name): at the end, the exported model (`prefalign export`) is pushed there
    push_to_hub: str | None = None
    hub_private: bool = True  # a repository push_to_hub creates is private
    hub_license: str | None = None  # the model card's license (e.g. apache-2.0; usually the base model's)

    def validate(self):
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"config key 'train.learning_rate' must be > 0, got {self.learning_rate}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(
                f"config key 'train.epochs' must be > 0, got {self.epochs} (or leave it unset and use "
                "train.max_steps)"
            )
        if self.lr_scheduler not in SCHEDULERS:
            close = difflib.get_close_matches(self.lr_scheduler, SCHEDULERS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"config key 'train.lr_scheduler': unknown schedule '{self.lr_scheduler}'; {hint}choose from "
                f"{', '.join(SCHEDULERS)}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'train.warmup_steps' must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.lr_scheduler == "constant":
            raise ConfigError(
                f"config key 'train.warmup_steps' ({self.warmup_steps}) is ignored by lr_scheduler constant: "
                "use lr_scheduler: constant_with_warmup, or warmup_steps: 0"
            )


# transformers schedules that step without a metric and need no extra arguments (checked in tests/test_train.py)
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)  # fmt: skip


def warmup_note(cfg: TrainConfig, steps: int) -> str | None:
    """A warning when the warmup is at least as long as the run: the learning rate never reaches
    `train.learning_rate` (legitimate in a smoke test, surprising anywhere else)."""
    if cfg.warmup_steps < steps:
        return None
    length = (
        f"train.max_steps {steps}" if cfg.epochs is None else f"{steps} steps (train.epochs {cfg.epochs:g})"
    )
    peak = cfg.learning_rate * (steps - 1) / cfg.warmup_steps  # step k (from 0) runs at lr * k / warmup
    return (
        f"warning: train.warmup_steps {cfg.warmup_steps} is not shorter than the run ({length}): the learning "
        f"rate peaks at {peak:.3g}, never reaching train.learning_rate {cfg.learning_rate:g}; lower "
        "train.warmup_steps to reach it"
    )


@dataclass
class FitResult:
    model: Any
    run_dir: Path | None
    history: list[dict]
    accelerator: Any


@dataclass
class Job:
    """One method's run, as the runner drives it. `step(model, batch) -> (loss, metrics)`;
    `evaluate(model) -> dict` (logged with an `eval/` prefix); `save(model, dir)` writes `final/`;
    `summarize(history) -> dict` adds the method's headline numbers to `summary.json`;
    `train(ctx) -> FitResult` replaces the single `fit` for methods with their own loop (EM-DPO);
    `info` = {name: text} lines the console shows before training (data, split, reference, packing)."""

    model: Any
    dataset: Sequence | None = None
    collate: Callable | None = None
    step: Callable | None = None
    evaluate: Callable | None = None
    stateful: dict | None = None
    save: Callable[[Any, Path], None] | None = None
    summarize: Callable[[list[dict]], dict] | None = None
    train: Callable[[Any], FitResult] | None = None
    desc: str = "train"
    info: dict[str, str] = field(default_factory=dict)


def join_evaluations(*fns: Callable | None) -> Callable | None:
    """One `evaluate_fn(model) -> dict` running every given one (None skipped); None when none is given."""
    fns = [fn for fn in fns if fn is not None]
    if not fns:
        return None
    return lambda model: {k: v for fn in fns for k, v in fn(model).items()}


# tracker name -> the pip package accelerate needs for it
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet-ml", "aim": "aim", "mlflow": "mlflow",
    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}  # fmt: skip


def check_trackers(names: list[str]) -> None:
    """Every `train.report_to` tracker is one accelerate knows and is installed: a ConfigError with the pip
    command otherwise (accelerate itself would only log a warning and train without it)."""
    known = {t.value for t in LoggerType} - {"all"}
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(
                f"config key 'train.report_to': unknown tracker '{name}'; choose from {', '.join(sorted(known))}"
            )
        if name not in installed:
            package = TRACKER_PACKAGES.get(name, name)
            extra = f"pip install 'prefalign[{name}]' or " if name == "tensorboard" else ""
            raise ConfigError(
                f"config key 'train.report_to': tracker '{name}' needs the '{package}' package, which is not "
                f"installed: {extra}pip install {package}"
            )


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    check_trackers(cfg.report_to)
    kwargs = {}
    if cfg.report_to and cfg.output_dir:
        kwargs = {"log_with": cfg.report_to, "project_dir": cfg.output_dir}
    return Accelerator(mixed_precision=cfg.mixed_precision, **kwargs)


def unwrap(model):
    """The bare model inside a DDP/FSDP/compile wrapper (e.g. to call PEFT's `disable_adapter`)."""
    return extract_model_from_parallel(model)


class BatchOrder:
    """Micro-batch k -> dataset indices, deterministic in (seed, k)."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n == 0:
            raise ConfigError("the training dataset is empty")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.batches_per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=gen).tolist()
            else:
                self._perm = list(range(self.n))
            self._epoch = epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]


def total_steps(cfg: TrainConfig, n_records: int, n_processes: int) -> int:
    """Optimizer steps of a run: `max_steps`, or `epochs` passes over `n_records`."""
    if cfg.epochs is None:
        return cfg.max_steps
    per_step = cfg.grad_accum * n_processes
    return max(1, math.ceil(cfg.epochs * math.ceil(n_records / cfg.batch_size) / per_step))


def _is_finite_everywhere(loss_sum: torch.Tensor, accelerator) -> bool:
    """One host sync per optimizer step: is the step's loss finite on every process?"""
    finite = torch.isfinite(loss_sum).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="min")
    return bool(finite.item())


def fit(
    model,
    dataset: Sequence,
    collate_fn: Callable[[list], Any],
    step_fn: Callable[[Any, Any], tuple[torch.Tensor, dict]],
    cfg: TrainConfig,
    *,
    evaluate_fn: Callable[[Any], dict] | None = None,
    stateful: dict | None = None,
    accelerator=None,
    desc: str = "train",
) -> FitResult:
    """Train `model` by minimizing `step_fn(model, batch)[0]`; see the module docstring."""
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.seed)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    n_proc = accelerator.num_processes
    order = BatchOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.shuffle)
    per_step = cfg.grad_accum * n_proc
    max_steps = total_steps(cfg, len(dataset), n_proc)
    note = warmup_note(cfg, max_steps)
    if note and accelerator.is_main_process:
        logger.warning(note)

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=False everywhere)")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per optimizer step

    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir else None, accelerator, bool(cfg.report_to))
    step, micro_batch = _resume(run_dir, cfg, model, optimizer, scheduler, accelerator, stateful, log)
    already_done = step >= max_steps
    if cfg.report_to and run_dir:
        accelerator.init_trackers(run_dir.name)

    def run_eval() -> None:
        if evaluate_fn is None:
            return
        if accelerator.is_main_process:
            bare = unwrap(model)
            was_training = bare.training
            bare.eval()
            with torch.no_grad():
                result = evaluate_fn(bare)
            bare.train(was_training)
            record = {"step": step, **{f"eval/{k}": _to_float(v) for k, v in result.items()}}
            log.write(record)
            if talk:
                console.say(console.eval_line(record))
        accelerator.wait_for_everyone()

    def checkpoint() -> None:
        if run_dir:
            state = {"step": step, "micro_batch": micro_batch, "time": time.time()}
            save_checkpoint(
                run_dir, step, model, optimizer, scheduler, state, accelerator, stateful, cfg.keep_checkpoints
            )

    talk = cfg.progress and accelerator.is_main_process  # console lines (and a bar, on a terminal)
    bar = console.progress(total=max_steps, initial=step, desc=desc, disable=not talk)
    started = time.time()
    noted_grad = False
    model.train()
    while step < max_steps:
        mine = [micro_batch + j for j in range(per_step) if j % n_proc == accelerator.process_index]
        step_metrics: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, k in enumerate(mine):
            batch = send_to_device(collate_fn([dataset[idx] for idx in order.indices(k)]), accelerator.device)
            sync = i == len(mine) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss, metrics = step_fn(model, batch)
            accelerator.backward(loss / cfg.grad_accum)
            loss_sum = loss_sum + loss.detach().float()
            for name, value in {"loss": loss, **metrics}.items():
                value = torch.as_tensor(value, device=accelerator.device).detach().float().mean()
                step_metrics[name] = step_metrics.get(name, 0.0) + value / len(mine)
        if not _is_finite_everywhere(loss_sum, accelerator):  # before the optimizer can apply a NaN
            good = checkpoints(run_dir) if run_dir else []
            where = f"; last good checkpoint: {good[-1]}" if good else ""
            raise NonFiniteLossError(f"non-finite loss at step {step + 1}{where}")
        if cfg.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        micro_batch += per_step
        log.add({**step_metrics, "grad_norm": grad_norm})
        bar.update(1)
        if step % cfg.log_every == 0 or step == max_steps:
            epoch = round(micro_batch / order.batches_per_epoch, 4)
            record = log.flush(step, {"epoch": epoch, "learning_rate": scheduler.get_last_lr()[0]})
            if talk:
                console.say(console.metrics_line(record, max_steps, time.time() - started))
                note = grad_note(record.get("grad_norm"), step, cfg.learning_rate)
                if note and not noted_grad:
                    noted_grad = True
                    console.say(note)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            run_eval()
        if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
            checkpoint()
    bar.close()
    if not already_done:
        run_eval()
        checkpoint()
    if cfg.report_to:
        accelerator.end_training()
    return FitResult(unwrap(model), run_dir, log.history, accelerator)


def grad_note(grad_norm: float | None, step: int, learning_rate: float) -> str | None:
    """Said once when a logged window's grad_norm is exactly 0 (the loss no longer moves the weights) or not
    finite (the clipped step is meaningless): both usually follow a learning rate far too high."""
    if grad_norm is None or (math.isfinite(grad_norm) and grad_norm != 0):
        return None
    high = f"; train.learning_rate {learning_rate:g} is unusually high" if learning_rate > 0.01 else ""
    what = "the loss no longer moves the weights" if grad_norm == 0 else "the updates are meaningless"
    return f"note: grad_norm is {grad_norm:g} at step {step}: {what}{high}"


def enable_gradient_checkpointing(model) -> None:
    """`train.gradient_checkpointing`: transformers' / diffusers' own switch (non-reentrant checkpoints, so
    frozen inputs and LoRA need no extra hooks); a config error for a model without one."""
    bare = unwrap(model)
    if getattr(bare, "supports_gradient_checkpointing", False) or hasattr(bare, "base_model"):
        # transformers (and peft, which forwards it)
        # packed batches: a recomputed layer runs with the packed attention again (core/packing.py)
        kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
        bare.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(bare, "enable_gradient_checkpointing"):  # diffusers
        bare.enable_gradient_checkpointing()
    else:
        raise ConfigError(
            f"config key 'train.gradient_checkpointing': {type(bare).__name__} has no gradient checkpointing"
        )


def _resume(run_dir, cfg, model, optimizer, scheduler, accelerator, stateful, log) -> tuple[int, int]:
    """(step, micro_batch) to start from: the newest complete checkpoint's, or (0, 0) for a fresh run."""
    if run_dir and accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".tmp-*"):  # a write killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    if run_dir and not cfg.resume and accelerator.is_main_process:  # starting over: old steps must not win
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    found = checkpoints(run_dir) if (run_dir and cfg.resume) else []
    if not found:
        log.start_fresh()
        return 0, 0
    state = load_checkpoint(found[-1], model, optimizer, scheduler, accelerator, stateful)
    log.resume(state["step"])
    accelerator.print(f"resumed from {found[-1]} (step {state['step']})")
    return state["step"], state["micro_batch"]


def _to_float(value) -> float:
    return float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
