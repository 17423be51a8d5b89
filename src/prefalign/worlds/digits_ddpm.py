"""The digits world's diffusion side: a tiny class-conditional DDPM (the base model to align), trained once
and cached, and AI-feedback pairs ordered by the world's judge. Registers the sources `world:digits`,
`world:digits-quick` (kind "diffusion", judged by the held-out evaluator) and `world:digits-judge` (pairs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from prefalign.core import console, sources
from prefalign.core.diffusion import draw_timesteps_and_noise, noise_pred_error, sample
from prefalign.core.images import to_model_space, to_pixel_space
from prefalign.worlds.digits import load_digits_split, make_world


@dataclass
class DigitsDDPMConfig:
    """A tiny class-conditional UNet on 8x8 digits (2 down blocks: 8 -> 4). `quick` shrinks training."""

    channels: tuple[int, int] = (16, 32)
    layers_per_block: int = 1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 2e-3
    world_seed: int = 0
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK_DDPM = DigitsDDPMConfig(steps=200, batch_size=64)


def build_digits_unet(cfg: DigitsDDPMConfig) -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=10,
    )


def build_scheduler(cfg: DigitsDDPMConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def train_digits_ddpm(cfg: DigitsDDPMConfig, progress: bool = True) -> tuple[UNet2DModel, DDPMScheduler]:
    """Plain DDPM training (ε-MSE) on the digits world's `train` split."""
    data = load_digits_split(cfg.world_seed)["train"]
    x_all, y_all = to_model_space(data["images"]), data["labels"]
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    unet, scheduler = build_digits_unet(cfg), build_scheduler(cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    unet.train()
    bar = tqdm(range(cfg.steps), desc="digits DDPM", disable=not (progress and console.bars()), leave=False)
    for _ in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        x0, labels = x_all[idx], y_all[idx]
        timesteps, noise = draw_timesteps_and_noise(scheduler, x0, generator)
        loss = noise_pred_error(unet, scheduler, x0, labels, timesteps, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_at.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return unet, scheduler


def load_digits_ddpm(quick: bool = False, cfg: DigitsDDPMConfig | None = None, progress: bool = True):
    """The base digits DDPM `(unet, scheduler)`, trained once and cached under
    `$PREFALIGN_CACHE/digits_ddpm/<config hash>/` (default `~/.cache/prefalign`), written atomically."""
    cfg = cfg or (QUICK_DDPM if quick else DigitsDDPMConfig())
    path = sources.cache_root() / "digits_ddpm" / cfg.key()
    if not (path / "unet" / "config.json").is_file():
        name = "world:digits" + ("-quick" if cfg == QUICK_DDPM else "")
        console.say(
            f"{name}: first use on this machine: training its DDPM ({cfg.steps} steps), cached in {path}"
        )
        unet, scheduler = train_digits_ddpm(cfg, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        unet.save_pretrained(tmp / "unet")  # safetensors
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "ddpm_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    unet = UNet2DModel.from_pretrained(path / "unet")
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    return unet.eval(), scheduler


def sample_digits(
    unet, scheduler, labels: torch.Tensor, steps: int = 20, sampler: str = "ddim", seed: int = 0
):
    """Class-conditional digits in pixel space [0, 1], shape [N, 1, 8, 8] (the sampler's output clipped)."""
    generator = torch.Generator().manual_seed(seed)
    x = sample(unet, scheduler, labels, (1, 8, 8), steps=steps, sampler=sampler, generator=generator)
    return to_pixel_space(x)


def judge_labelled_pairs(unet, scheduler, n_pairs: int, world_seed: int = 0, steps: int = 20, seed: int = 0):
    """Two base samples per label, ordered by the digits world's judge (probability of the intended class).
    Returns numpy arrays chosen/rejected [N,1,8,8] in [0, 1], context [N] and the judge scores."""
    judge = make_world(world_seed).judge
    labels = torch.arange(n_pairs) % 10
    a = sample_digits(unet, scheduler, labels, steps=steps, seed=seed)
    b = sample_digits(unet, scheduler, labels, steps=steps, seed=seed + 1)
    score_a, score_b = judge(a, labels), judge(b, labels)
    a_wins = (score_a >= score_b).view(-1, 1, 1, 1)
    return {
        "chosen": torch.where(a_wins, a, b).numpy(),
        "rejected": torch.where(a_wins, b, a).numpy(),
        "context": labels.numpy(),
        "judge_chosen": torch.maximum(score_a, score_b).numpy(),
        "judge_rejected": torch.minimum(score_a, score_b).numpy(),
    }


def evaluator(samples_per_class: int = 50, steps: int = 20, seed: int = 1234, world_seed: int = 0):
    """evaluate_fn(unet, scheduler) -> held-out evaluator score and diversity of class-conditional samples."""
    world = make_world(world_seed)
    labels = torch.arange(10).repeat(samples_per_class)

    def evaluate(unet, scheduler):
        x = sample_digits(unet, scheduler, labels, steps=steps, seed=seed)
        return {"score": float(world.score(x, labels).mean()), "diversity": float(world.diversity(x, labels))}

    return evaluate


def _evaluate_source(parts, samples_per_class: int = 50, **_) -> dict:
    return evaluator(samples_per_class)(parts.unet, parts.scheduler)


def _judge_pairs(parts, n_pairs: int = 1000, sample_steps: int = 20, seed: int = 0) -> dict:
    arrays = judge_labelled_pairs(parts.unet, parts.scheduler, n_pairs, 0, sample_steps, seed=seed)
    return {k: arrays[k] for k in ("chosen", "rejected", "context")}


sources.register("world:digits", "diffusion", lambda: load_digits_ddpm(quick=False), _evaluate_source,
                 "the digits world's class-conditional DDPM (8x8, trained once, cached)")  # fmt: skip
sources.register("world:digits-quick", "diffusion", lambda: load_digits_ddpm(quick=True), _evaluate_source,
                 "a shorter-trained digits DDPM, for tests and quick demos")  # fmt: skip
sources.register("world:digits-judge", "pairs", _judge_pairs,
                 description="pairs of base samples ordered by the digits world's judge (AI feedback)")  # fmt: skip
