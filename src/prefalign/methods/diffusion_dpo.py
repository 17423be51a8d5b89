"""Diffusion-DPO (Wallace et al., arXiv 2311.12908) on a `diffusers` UNet.

For a pair (x_w, x_l) with condition c, draw ONE timestep t and ONE noise ε shared by both images and
compare the policy's per-sample noise-prediction error e(θ, x) with the frozen reference's e(ref, x):

    inside = −0.5·β·[ (e(θ,x_w) − e(ref,x_w)) − (e(θ,x_l) − e(ref,x_l)) ]
    loss   = −log σ(inside)                                   (`prefalign.losses.diffusion_dpo_loss`)

This is the official convention (β = 5000 for SD-1.5). The diffusers research example writes the same loss
as −log σ(β'·(ref_diff − model_diff)) with β' = β/2 (its default 2500). Implicit accuracy = mean(inside > 0).

The reference is a frozen copy of the initial UNet or, with LoRA, the same UNet with its adapters disabled
(`model.reference.strategy: adapter`, no second copy in memory). Pairs come from a file (`.npz`,
`.safetensors`, an image folder with a label) or from a world source such as `world:digits-judge`.
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefalign.core import sources
from prefalign.core.config import build_loss
from prefalign.core.diffusion import (
    MODEL_RENAMES,
    DiffusionModelConfig,
    draw_timesteps_and_noise,
    evaluate_final,
    load_base,
    load_final,
    load_unet,
    paired_errors,
    reference_strategy,
    save_unet,
    set_adapters_enabled,
    world_evaluation,
)
from prefalign.core.errors import ConfigError
from prefalign.core.images import (
    ImageDataConfig,
    ImageDataset,
    collate_images,
    evaluation_pairs,
    load_image_pairs,
)
from prefalign.core.metrics import WeightedMean
from prefalign.core.train import Job, TrainConfig, unwrap
from prefalign.losses.diffusion import diffusion_dpo_loss

LOSSES = {"diffusion_dpo": diffusion_dpo_loss}
RENAMES = MODEL_RENAMES


@dataclass
class LossConfig:
    name: str = "diffusion_dpo"  # the only loss: diffusion_dpo
    beta: float | None = None  # official convention (the −0.5 is in the loss); default 5000 = diffusers' 2500

    def validate(self):
        build_loss(self, LOSSES)
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"config key 'loss.beta' must be > 0, got {self.beta}")


@dataclass
class Config:
    method: str = "diffusion_dpo"
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/diffusion_dpo", learning_rate=1e-5)
    )


@contextmanager
def adapters_disabled(model):
    bare = unwrap(model)
    set_adapters_enabled(bare, False)
    try:
        yield bare
    finally:
        set_adapters_enabled(bare, True)


def make_reference(model, mode: str):
    """A callable context giving the reference network: a frozen copy, or the model with LoRA disabled
    (`adapter`, also accepted under its old name `lora_disabled`)."""
    if mode in ("adapter", "lora_disabled"):
        return lambda: adapters_disabled(model)
    frozen = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()

    @contextmanager
    def frozen_ref():
        yield frozen

    return frozen_ref


def make_step(scheduler, reference, beta: float = 5000.0):
    """step_fn for `core.train.fit`: one shared (t, ε) per pair, the policy's and reference's errors."""

    def step(model, batch):
        chosen, rejected, cond = batch["chosen"], batch["rejected"], batch["context"]
        timesteps, noise = draw_timesteps_and_noise(scheduler, chosen)
        model_w, model_l = paired_errors(model, scheduler, [chosen, rejected], cond, timesteps, noise)
        with torch.no_grad(), reference() as ref:
            ref_w, ref_l = paired_errors(ref, scheduler, [chosen, rejected], cond, timesteps, noise)
        losses, chosen_rewards, rejected_rewards = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta)
        margins = chosen_rewards - rejected_rewards
        return losses.mean(), {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "mse/chosen": model_w.detach().mean(),
            "mse/rejected": model_l.detach().mean(),
            "mse/ref_chosen": ref_w.mean(),
        }

    return step


def setup(cfg: Config, ctx, **_) -> Job:
    unet, scheduler = load_base(cfg.model, cfg.train.seed)
    data = load_image_pairs(cfg.data, unet, scheduler, cfg.train.seed, ctx.run_dir, need_rejected=True)
    unet.to(ctx.accelerator.device)
    _, _, options = build_loss(cfg.loss, LOSSES)
    return Job(
        model=unet,
        dataset=ImageDataset(data),
        collate=collate_images,
        step=make_step(scheduler, make_reference(unet, reference_strategy(cfg)), **options),
        evaluate=world_evaluation(cfg, scheduler),
        save=lambda trained, path: save_unet(trained, scheduler, path),
        desc="diffusion-dpo",
    )


@torch.no_grad()
def evaluate_pairs(
    unet, reference, scheduler, data: dict, beta: float = 5000.0, batch_size: int = 64, seed: int = 0
):
    """Diffusion-DPO loss and implicit accuracy of `unet` against `reference` on pairs, with (t, ε) drawn from
    `seed`: weighted over all pairs, so the batch size does not change the numbers' meaning."""
    step = make_step(scheduler, lambda: contextlib.nullcontext(reference), beta)
    dataset, total = ImageDataset(data), WeightedMean()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(dataset), batch_size):
            batch = collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            loss, metrics = step(unet, batch)
            total.add({"loss": loss, **metrics}, len(batch["chosen"]))
    return total.result()


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """`prefalign eval RUN_DIR`: Diffusion-DPO loss and implicit accuracy of `final/` against the base on the
    held-out pairs (`data.eval`; else the training pairs, reported as `train_pairs/...`), and the world's
    ground truth when the base is a world source."""
    unet, scheduler = load_final(run_dir)
    base, _ = load_unet(cfg.model.name_or_path)
    name, data = evaluation_pairs(cfg.data, run_dir)
    _, _, options = build_loss(cfg.loss, LOSSES)
    out = {f"{name}/{k}": v for k, v in evaluate_pairs(unet, base.eval(), scheduler, data, **options).items()}
    if sources.is_source(cfg.model.name_or_path):
        out.update(evaluate_final(run_dir, cfg))
    return out
