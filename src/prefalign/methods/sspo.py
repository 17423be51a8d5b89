"""SSPO: Self-Sampling Preference Optimization (Zhang et al., arXiv 2410.05255) — winners only, no pairs.

Random Checkpoint Replay (RCR): keep a bank of K past policy snapshots (the initial model included, one
every N updates). Each step draws one snapshot (uniformly by default); it is both the reference network in
the loss and the generator of a reference sample x_ref for the same condition, which plays the loser.

Self-Sampling Regularization (SSR): with ONE shared (t, ε) per example,

    Δ_w = e(θ, x_w) − e(ckpt, x_w),   Δ_r = e(θ, x_ref) − e(ckpt, x_ref)
    s   = +1 if Δ_w ≤ 0 else −1          (detached: the sign carries no gradient)
    loss = −log σ( −0.5·β·(Δ_w − s·Δ_r) )

s = +1 is exactly Diffusion-DPO with x_ref as the loser; s = −1 pushes both errors down (SFT-like).
The sign/tie rule, keeping the initial snapshot pinned in the bank, and one draw per micro-batch are
reconstructions (no public training code): each is a named option (`loss.ssr`, `sspo.bank.keep_initial`).
One (t, ε) draw's Δ_w is a noisy estimate of its sign: `sspo.sign_draws` = M reads s from Δ_w averaged over
M draws (the loss still uses its own draw), and `sspo.sign_check_draws` logs how often the sign used agrees
with a many-draw estimate (`sspo/sign_agreement`).
`loss.name: sft` is the SFT-on-winners baseline (plain denoising loss on x_w).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from prefalign.core.checkpoint import trainable_state
from prefalign.core.conditioning import Conditioner, cache_latents
from prefalign.core.config import build_loss
from prefalign.core.diffusion import (
    draw_timesteps_and_noise,
    map_cond,
    noise_pred_error,
    paired_errors,
    row_generators,
    sample,
)
from prefalign.core.errors import ConfigError
from prefalign.core.images import (
    ImageDataConfig,
    ImageDataset,
    collate_images,
    data_row,
    evaluation_pairs,
    load_image_pairs,
)
from prefalign.core.pipelines import (
    MODEL_RENAMES,
    DiffusionModelConfig,
    load_base,
    load_parts,
    load_trained,
    save_trained,
    world_evaluation,
    world_score,
)
from prefalign.core.train import Job, TrainConfig, unwrap
from prefalign.losses.diffusion import diffusion_sft_loss, sspo_loss, ssr_sign

LOSSES = {"sspo": sspo_loss, "sft": diffusion_sft_loss}
RENAMES = {
    **MODEL_RENAMES,
    "objective": "loss.name",
    "ssr": "loss.ssr",
    "bank": "sspo.bank",
    "reference_sample": "sspo.reference_sample",
}


@dataclass
class BankConfig:
    size: int = 7  # K snapshots at most (the paper's setting: 7, one every 30 updates)
    save_every: int = 30  # optimizer updates between snapshots
    draw: Literal["random", "initial", "latest"] = "random"  # initial ~ DITTO, latest ~ SPIN (ablations)
    keep_initial: bool = True  # reconstruction: the initial model never leaves the bank


@dataclass
class RefSampleConfig:
    sampler: Literal["ddim", "ddpm"] = "ddim"  # sampler of the reference samples x_ref
    steps: int = 10  # its denoising steps
    # reuse x_ref per (snapshot, row); results are identical, only faster (each row draws its own noise)
    cache: bool = True


@dataclass
class SSPOSettings:
    """`sspo:` — random checkpoint replay and the reference samples."""

    bank: BankConfig = field(default_factory=BankConfig)
    reference_sample: RefSampleConfig = field(default_factory=RefSampleConfig)
    # classifier-free guidance of the reference samples (text pipelines; 1 = none; diffusers' SD default 7.5)
    guidance_scale: float = 1.0
    # SSR's sign from Δ_w averaged over this many (t, ε) draws: the loss's own draw + the rest without
    # gradient (2 forwards of the winners each). 1 = the sign of the loss's single shared draw
    sign_draws: int = 1
    # 0 = off. N > 0: every `sign_check_every` micro-batches whose snapshot is not the current model, the sign
    # is also estimated from N fresh draws (own seeded generator: training is unchanged) and
    # `sspo/sign_agreement` (the sign used vs that estimate) and `sspo/sign_agreement_one_draw` are logged
    sign_check_draws: int = 0
    sign_check_every: int = 10  # micro-batches between two checks of the sign (with sign_check_draws > 0)

    def validate(self):
        if self.bank.size < 1 or self.bank.save_every < 1:
            raise ConfigError("config keys 'sspo.bank.size' and 'sspo.bank.save_every' must be >= 1")
        if self.sign_draws < 1 or self.sign_check_every < 1 or self.sign_check_draws < 0:
            raise ConfigError(
                "config keys 'sspo.sign_draws' and 'sspo.sign_check_every' must be >= 1 and "
                f"'sspo.sign_check_draws' >= 0, got {self.sign_draws}, {self.sign_check_every}, "
                f"{self.sign_check_draws}"
            )
        if self.guidance_scale < 1:
            raise ConfigError(
                f"config key 'sspo.guidance_scale' must be >= 1 (1 = no guidance), got {self.guidance_scale}"
            )


@dataclass
class LossConfig:
    name: Literal["sspo", "sft"] = "sspo"  # sft: the SFT-on-winners baseline (plain denoising loss)
    beta: float | None = None  # official Diffusion-DPO convention (−0.5 in the loss); default 5000
    ssr: Literal["sign", "indicator", "none"] | None = (
        None  # default sign; none: s = +1 (the "no SSR" ablation)
    )

    def validate(self):
        build_loss(self, LOSSES)


@dataclass
class Config:
    method: str = "sspo"
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)  # only `chosen` + `context` (winners)
    loss: LossConfig = field(default_factory=LossConfig)
    sspo: SSPOSettings = field(default_factory=SSPOSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/sspo", learning_rate=1e-5)
    )

    def validate(self):
        uses_sign = self.loss.name == "sspo" and (self.loss.ssr or "sign") != "none"
        if not uses_sign and (self.sspo.sign_draws > 1 or self.sspo.sign_check_draws > 0):
            raise ConfigError(
                "config keys 'sspo.sign_draws' > 1 and 'sspo.sign_check_draws' > 0 need an SSR sign "
                f"(loss.name sspo with loss.ssr sign or indicator); got loss.name {self.loss.name}, "
                f"loss.ssr {self.loss.ssr}"
            )


class CheckpointBank:
    """Past snapshots of the trainable parameters (CPU copies: LoRA adapters only when training LoRA).

    Snapshot 0 is the initial model. `add_if_due(model, update)` stores one every `save_every` updates and
    evicts the oldest (never the initial one when `keep_initial`). Each snapshot has an `id` (its update
    number) so cached reference samples can be keyed by it. `state_dict` holds tensors and ints only, so
    the training loop checkpoints it and resume restores it exactly.
    """

    def __init__(self, model, cfg: BankConfig):
        self.cfg = cfg
        self.ids: list[int] = [0]
        self.entries: list[dict[str, torch.Tensor]] = [trainable_state(unwrap(model))]

    def add_if_due(self, model, update: int) -> bool:
        if update == 0 or update % self.cfg.save_every or update in self.ids:
            return False
        self.ids.append(update)
        self.entries.append(trainable_state(unwrap(model)))
        if len(self.entries) > self.cfg.size:
            drop = 1 if (self.cfg.keep_initial and len(self.entries) > 1) else 0
            del self.ids[drop], self.entries[drop]
        return True

    def draw(self) -> int:
        """Position of the snapshot to use this step (global torch RNG, so resume replays it)."""
        if self.cfg.draw == "initial":
            return 0  # the oldest snapshot: the initial model while keep_initial
        if self.cfg.draw == "latest":
            return len(self.entries) - 1
        return int(torch.randint(len(self.entries), ()).item())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.entries for t in entry.values())

    def state_dict(self) -> dict:
        return {"ids": list(self.ids), "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.ids = [int(i) for i in state["ids"]]
        self.entries = [{k: v.clone() for k, v in e.items()} for e in state["entries"]]


class ReferenceNet:
    """One frozen copy of the network; the drawn snapshot's weights are copied into it when it changes."""

    def __init__(self, model):
        self.net = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()
        self.params = dict(self.net.named_parameters())
        self.loaded_id: int | None = None

    def load(self, bank: CheckpointBank, position: int):
        if bank.ids[position] != self.loaded_id:
            with torch.no_grad():
                for name, tensor in bank.entries[position].items():
                    self.params[name].copy_(tensor)
            self.loaded_id = bank.ids[position]
        return self.net


def reference_samples(
    net, scheduler, cond, rows, snapshot_id: int, cfg: RefSampleConfig, seed: int, cache: dict | None,
    *, shape=None, uncond=None, guidance_scale: float = 1.0, pixel_space: bool = True,
):  # fmt: skip
    """x_ref for each row: the snapshot's sample for the row's condition (a tensor or an SDXL dict), with
    classifier-free guidance against `uncond` when `guidance_scale` > 1. Each row samples with its own
    generator seeded by (seed, snapshot id, row), for its start noise and DDPM's step noise alike, so a sample
    depends only on them: caching changes speed, not results. Pixel-space samples are clipped to [-1, 1]
    (valid images); latents are left as they are."""
    rows = [int(r) for r in rows]
    cache = {} if cache is None else cache
    missing = [i for i, r in enumerate(rows) if (snapshot_id, r) not in cache]
    if missing:
        shape = tuple(shape) if shape is not None else image_shape(net)
        seeds = [(seed * 1_000_003 + snapshot_id) * 10_000_019 + rows[i] for i in missing]
        index = torch.tensor(missing)
        pick = lambda t: t[index.to(t.device)]  # noqa: E731
        generated = sample(
            net, scheduler, map_cond(pick, cond), shape, steps=cfg.steps, sampler=cfg.sampler,
            generator=row_generators(seeds), guidance_scale=guidance_scale, uncond=map_cond(pick, uncond),
        )  # fmt: skip
        if pixel_space:
            generated = generated.clamp(-1, 1)
        for i, x in zip(missing, generated.cpu()):
            cache[(snapshot_id, rows[i])] = x
    device = next(net.parameters()).device
    return torch.stack([cache[(snapshot_id, r)] for r in rows]).to(device)


def image_shape(net) -> tuple[int, ...]:
    config = net.config
    size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else (config.sample_size,) * 2
    return (config.in_channels, *size)


class SSPOState:
    """Everything SSPO keeps across steps: the bank, the update counter, the reference net and x_ref cache."""

    def __init__(self, model, cfg: Config, micro_batches_per_update: int):
        self.cfg, self.per_update = cfg, micro_batches_per_update
        self.bank = CheckpointBank(model, cfg.sspo.bank)
        self.reference = ReferenceNet(model)
        self.micro_batches = 0
        self.cache: dict | None = {} if cfg.sspo.reference_sample.cache else None

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict(), "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])
        self.micro_batches = int(state["micro_batches"])
        self.reference.loaded_id = None

    def prune_cache(self) -> None:
        if self.cache is not None:
            alive = set(self.bank.ids)
            for key in [k for k in self.cache if k[0] not in alive]:
                del self.cache[key]


@torch.no_grad()
def mean_winner_delta(model, ckpt, scheduler, winners, cond, draws: int, generator=None) -> torch.Tensor:
    """Δ_w = e(θ, x_w) − e(ckpt, x_w) averaged over `draws` fresh (t, ε) draws per example, [B], without
    gradient. Each draw is one forward of each network on the B winners (the memory of a training step);
    the draws come from `generator` (None: the global RNG, which resume restores)."""
    total = torch.zeros(len(winners), device=winners.device)
    for _ in range(draws):
        timesteps, noise = draw_timesteps_and_noise(scheduler, winners, generator)
        total += noise_pred_error(model, scheduler, winners, cond, timesteps, noise)
        total -= noise_pred_error(ckpt, scheduler, winners, cond, timesteps, noise)
    return total / draws


def make_step(scheduler, state: SSPOState | None, cfg: Config, conditioner: Conditioner | None = None):
    """step_fn for `core.train.fit`: SSPO (checkpoint drawn from the bank, its sample as the loser) or SFT.
    Without a `conditioner` the batch already holds the UNet's inputs: `chosen` and `context`."""
    _, _, options = build_loss(cfg.loss, LOSSES)
    pixel_space = conditioner is None or conditioner.parts.vae is None
    draws = cfg.sspo.sign_draws

    def step(model, batch):
        if conditioner is None:
            winners, cond, train_cond = batch["chosen"], batch["context"], batch["context"]
        else:
            winners, cond = conditioner.model_images(batch["chosen"]), conditioner.condition(batch)
            train_cond = conditioner.drop_captions(cond) if model.training else cond
        timesteps, noise = draw_timesteps_and_noise(scheduler, winners)
        if cfg.loss.name == "sft":
            model_w = noise_pred_error(model, scheduler, winners, train_cond, timesteps, noise)
            return diffusion_sft_loss(model_w).mean(), {"mse/chosen": model_w.detach().mean()}
        updates = state.micro_batches // state.per_update  # optimizer updates done before this step
        if state.micro_batches % state.per_update == 0 and state.bank.add_if_due(model, updates):
            state.prune_cache()
        state.micro_batches += 1
        position = state.bank.draw()
        snapshot_id = state.bank.ids[position]
        ckpt = state.reference.load(state.bank, position)
        guidance = cfg.sspo.guidance_scale
        x_ref = reference_samples(
            ckpt, scheduler, cond, batch["index"], snapshot_id, cfg.sspo.reference_sample, cfg.train.seed,
            state.cache, shape=winners.shape[1:], guidance_scale=guidance, pixel_space=pixel_space,
            uncond=conditioner.unconditional(cond) if guidance > 1 and conditioner is not None else None,
        )  # fmt: skip
        model_w, model_r = paired_errors(model, scheduler, [winners, x_ref], train_cond, timesteps, noise)
        with torch.no_grad():
            ckpt_w, ckpt_r = paired_errors(ckpt, scheduler, [winners, x_ref], train_cond, timesteps, noise)
            one_draw = model_w.detach() - ckpt_w  # Δ_w of the loss's own (t, ε)
            statistic = one_draw
            if draws > 1:  # the same mean over `draws` draws, the loss's own first
                rest = mean_winner_delta(model, ckpt, scheduler, winners, train_cond, draws - 1)
                statistic = (one_draw + (draws - 1) * rest) / draws
        losses, sign, inside = sspo_loss(
            model_w, model_r, ckpt_w, ckpt_r, **options, sign_delta_w=None if draws == 1 else statistic
        )
        metrics = {
            "sspo/flip_rate": (sign < 0).float().mean(),
            "sspo/snapshot_age": float(updates - snapshot_id),
            "sspo/bank_size": float(len(state.bank.ids)),
            "rewards/margins": inside.mean(),
            "rewards/accuracies": (inside > 0).float().mean(),
            "mse/chosen": model_w.detach().mean(),
            "mse/reference_sample": model_r.detach().mean(),
        }
        check = cfg.sspo.sign_check_draws
        if check and (state.micro_batches - 1) % cfg.sspo.sign_check_every == 0 and updates > snapshot_id:
            # the snapshot differs from the current model (age > 0: at age 0 every Δ_w is exactly 0)
            generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + state.micro_batches)
            reference = ssr_sign(
                mean_winner_delta(model, ckpt, scheduler, winners, train_cond, check, generator)
            )
            metrics["sspo/sign_agreement"] = (sign == reference).float().mean()
            metrics["sspo/sign_agreement_one_draw"] = (ssr_sign(one_draw) == reference).float().mean()
        return losses.mean(), metrics

    return step


def setup(cfg: Config, ctx, **_) -> Job:
    parts = load_base(cfg.model, cfg.train.seed)
    parts.to(ctx.accelerator.device)
    conditioner = Conditioner(parts, cfg.data.caption_dropout)
    if cfg.sspo.guidance_scale > 1 and conditioner.pipe is None:
        raise ConfigError("config key 'sspo.guidance_scale': guidance needs a text-conditioned pipeline")
    data = load_image_pairs(cfg.data, parts, cfg.train.seed, ctx.run_dir, need_rejected=False)
    data.data.pop("rejected", None)  # winners only
    if cfg.data.caption_dropout > 0 and "caption" not in data.data:
        raise ConfigError("config key 'data.caption_dropout' needs captions in the data")
    if cfg.data.latent_cache:
        data = cache_latents(data, conditioner, cfg.data.cache_dir)
    parts.unet.to(ctx.accelerator.device)
    state = SSPOState(parts.unet, cfg, cfg.train.grad_accum) if cfg.loss.name == "sspo" else None

    def summarize(history) -> dict:
        return {
            "ssr": cfg.loss.ssr or "sign",
            "draw": cfg.sspo.bank.draw,
            "sign_draws": cfg.sspo.sign_draws,
            "bank_bytes": state.bank.nbytes() if state else 0,
        }

    return Job(
        model=parts.unet,
        dataset=data,
        collate=collate_images,
        step=make_step(parts.scheduler, state, cfg, conditioner),
        evaluate=world_evaluation(cfg, parts),
        stateful={"sspo": state} if state else None,
        save=lambda trained, path: save_trained(trained, parts, cfg.model.lora, path),
        summarize=summarize,
        desc=cfg.loss.name,
        info={"data": data_row(cfg.data, data, bool(cfg.data.latent_cache and parts.vae is not None))},
    )


@torch.no_grad()
def winner_errors(unet, base, scheduler, data, batch_size: int = 64, seed: int = 0, conditioner=None) -> dict:
    """Mean denoising error of `unet` and of `base` on the winners at the same seeded (t, ε): SSPO's data has
    no losers, so this is what can be measured without a world (lower = the winners are more likely)."""
    dataset = ImageDataset(data) if isinstance(data, dict) else data
    sums = torch.zeros(2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(dataset), batch_size):
            batch = collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            if conditioner is None:
                winners, cond = batch["chosen"], batch["context"]
            else:
                winners, cond = conditioner.model_images(batch["chosen"]), conditioner.condition(batch)
            timesteps, noise = draw_timesteps_and_noise(scheduler, winners)
            for k, net in enumerate((unet, base)):
                sums[k] += noise_pred_error(net, scheduler, winners, cond, timesteps, noise).sum()
    return {"mse/chosen": float(sums[0]) / len(dataset), "mse/chosen_base": float(sums[1]) / len(dataset)}


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """`prefalign eval RUN_DIR`: denoising error of `final/` and of the base on the winners (`data.eval`, else
    the training winners, reported as `train_pairs/...`), and the world's ground truth on a world base."""
    base = load_parts(cfg.model)
    trained = load_trained(run_dir, cfg.model, base)
    name, data = evaluation_pairs(cfg.data, run_dir, trained, need_rejected=False)
    errors = winner_errors(
        trained.unet, base.unet.eval(), trained.scheduler, data, conditioner=Conditioner(trained)
    )
    out = {f"{name}/{k}": v for k, v in errors.items()}
    out.update(world_score(trained, cfg))
    return out
