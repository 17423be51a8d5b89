"""Diffusion-DPO (Wallace et al., arXiv 2311.12908) on a `diffusers` UNet: a Stable Diffusion pipeline
(SD-1.x/2.x, SDXL) or a bare class-conditional UNet.

For a pair (x_w, x_l) with condition c, draw ONE timestep t and ONE noise ε shared by both images and
compare the policy's per-sample noise-prediction error e(θ, x) with the frozen reference's e(ref, x):

    inside = −0.5·β·[ (e(θ,x_w) − e(ref,x_w)) − (e(θ,x_l) − e(ref,x_l)) ]
    loss   = −log σ(inside)                                   (`prefalign.losses.diffusion_dpo_loss`)

This is the official convention (β = 5000 for SD-1.5 and SDXL). diffusers' SD-1.5 research script writes the
same loss as −log σ(β'·(ref_diff − model_diff)) with β' = β/2 (its default 2500); its SDXL script uses the
−0.5·β form with 5000. Implicit accuracy = mean(inside > 0). With a pipeline, x is the VAE latent and c the
caption encoded by the pipeline's text encoder(s) (`core.conditioning`).

The reference is a frozen copy of the initial UNet or, with LoRA, the same UNet with its adapters disabled
(`model.reference.strategy: adapter`, no second copy in memory). Pairs come from a file (arrays, a
Pick-a-Pic-style table, an image folder with an index) or from a world source such as `world:digits-judge`.
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefalign.core.conditioning import Conditioner, cache_latents
from prefalign.core.config import build_loss
from prefalign.core.diffusion import draw_timesteps_and_noise, paired_errors
from prefalign.core.errors import ConfigError
from prefalign.core.images import (
    ImageDataConfig,
    ImageDataset,
    collate_images,
    data_row,
    evaluation_pairs,
    load_image_pairs,
)
from prefalign.core.metrics import WeightedMean
from prefalign.core.pipelines import (
    MODEL_RENAMES,
    DiffusionModelConfig,
    load_base,
    load_parts,
    load_trained,
    reference_strategy,
    save_trained,
    set_adapters_enabled,
    world_evaluation,
    world_score,
)
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


def make_step(scheduler, reference, beta: float = 5000.0, conditioner: Conditioner | None = None):
    """step_fn for `core.train.fit`: one shared (t, ε) per pair, the policy's and reference's errors.
    Without a `conditioner` the batch already holds the UNet's inputs: `chosen`, `rejected`, `context`."""

    def step(model, batch):
        if conditioner is None:
            chosen, rejected, cond = batch["chosen"], batch["rejected"], batch["context"]
        else:
            inputs = conditioner.inputs(batch, train=model.training)
            chosen, rejected, cond = inputs["chosen"], inputs["rejected"], inputs["cond"]
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
    parts = load_base(cfg.model, cfg.train.seed)
    parts.to(ctx.accelerator.device)
    conditioner = Conditioner(parts, cfg.data.caption_dropout)
    data = load_image_pairs(cfg.data, parts, cfg.train.seed, ctx.run_dir, need_rejected=True)
    if cfg.data.caption_dropout > 0 and "caption" not in data.data:
        raise ConfigError("config key 'data.caption_dropout' needs captions in the data")
    if cfg.data.latent_cache:
        data = cache_latents(data, conditioner, cfg.data.cache_dir)
    parts.unet.to(ctx.accelerator.device)
    _, _, options = build_loss(cfg.loss, LOSSES)
    return Job(
        model=parts.unet,
        dataset=data,
        collate=collate_images,
        step=make_step(
            parts.scheduler,
            make_reference(parts.unet, reference_strategy(cfg)),
            conditioner=conditioner,
            **options,
        ),
        evaluate=world_evaluation(cfg, parts),
        save=lambda trained, path: save_trained(trained, parts, cfg.model.lora, path),
        desc="diffusion-dpo",
        info={"data": data_row(cfg.data, data, bool(cfg.data.latent_cache and parts.vae is not None))},
    )


@torch.no_grad()
def evaluate_pairs(
    unet,
    reference,
    scheduler,
    data,
    beta: float = 5000.0,
    batch_size: int = 64,
    seed: int = 0,
    conditioner=None,
):
    """Diffusion-DPO loss and implicit accuracy of `unet` against `reference` on pairs (a dataset, or a dict
    of columns), with (t, ε) drawn from `seed`: weighted over all pairs, so the batch size does not change
    the numbers' meaning. Captions are encoded without dropout."""
    step = make_step(scheduler, lambda: contextlib.nullcontext(reference), beta, conditioner)
    dataset = ImageDataset(data) if isinstance(data, dict) else data
    total = WeightedMean()
    was_training = unet.training
    unet.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(dataset), batch_size):
            batch = collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            loss, metrics = step(unet, batch)
            total.add({"loss": loss, **metrics}, len(batch["chosen"]))
    unet.train(was_training)
    return total.result()


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """`prefalign eval RUN_DIR`: Diffusion-DPO loss and implicit accuracy of `final/` against the base on the
    held-out pairs (`data.eval`; else the training pairs, reported as `train_pairs/...`), and the world's
    ground truth when the base is a world source."""
    base = load_parts(cfg.model)
    trained = load_trained(run_dir, cfg.model, base)
    name, data = evaluation_pairs(cfg.data, run_dir, trained)
    _, _, options = build_loss(cfg.loss, LOSSES)
    metrics = evaluate_pairs(
        trained.unet, base.unet.eval(), trained.scheduler, data, conditioner=Conditioner(trained), **options
    )
    out = {f"{name}/{k}": v for k, v in metrics.items()}
    out.update(world_score(trained, cfg))
    return out
