"""Shared diffusion mechanics: per-sample noise-prediction error and sampling.

Diffusion-DPO and SSPO compare how well two networks denoise the same images. Both need
`e(θ, x) = mean over pixels ‖target − f_θ(x_t, c, t)‖²` where `x_t` is `x` noised at timestep `t`
with noise `ε`, and the target is `ε` (epsilon prediction), the velocity `v` (v-prediction) or `x`
(sample prediction), as the scheduler's `prediction_type` says. Every image of one training example
(winner and loser, or winner and reference sample) must share ONE `t` and ONE `ε`, otherwise the
difference of errors measures the noise draw instead of the model: `paired_errors` enforces that.

`x` is what the UNet denoises: pixels in [-1, 1] for a pixel-space UNet, VAE latents (times the VAE's
scaling factor, unbounded) for a Stable Diffusion pipeline. A condition is integer class labels
(`UNet2DModel` `class_labels`), float embeddings [B, L, D] (`encoder_hidden_states`) or a dict of
keyword arguments, possibly nested (SDXL: `encoder_hidden_states` + `added_cond_kwargs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

# ---------------------------------------------------------------- conditions (tensor or nested dict)


def cond_rows(cond) -> int:
    """Batch size of a condition: a tensor, or a (nested) dict of tensors."""
    if torch.is_tensor(cond):
        return len(cond)
    return cond_rows(next(iter(cond.values())))


def map_cond(fn, cond):
    """`fn` applied to every tensor of a condition, keeping its (nested dict) shape; None stays None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: map_cond(fn, value) for key, value in cond.items()}
    return fn(cond)


def cat_cond(conds: list):
    """Conditions of several batches joined along the batch dimension (same nested shape)."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {key: cat_cond([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


# ---------------------------------------------------------------- noise-prediction error


def unet_forward(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """Call a diffusers UNet with its condition: int labels -> class_labels, float [B,L,D] -> encoder states,
    a dict -> keyword arguments."""
    if cond is None:
        out = unet(noisy, timesteps)
    elif isinstance(cond, dict):
        out = unet(noisy, timesteps, **cond)
    elif not torch.is_floating_point(cond):
        out = unet(noisy, timesteps, class_labels=cond)
    else:
        out = unet(noisy, timesteps, encoder_hidden_states=cond)
    return out.sample if hasattr(out, "sample") else out


def training_target(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown scheduler prediction_type {kind!r}: expected epsilon, v_prediction or sample")


def noise_pred_error(unet, scheduler, x0, cond, timesteps, noise) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction, shape [B]."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    pred = unet_forward(unet, noisy, timesteps, cond)
    target = training_target(scheduler, x0, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def draw_timesteps_and_noise(scheduler, x0: torch.Tensor, generator=None):
    """One timestep per example and one noise tensor shaped like `x0` (to be shared by its images)."""
    n = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, n, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return timesteps, noise


def paired_errors(unet, scheduler, images: list[torch.Tensor], cond, timesteps, noise) -> list[torch.Tensor]:
    """Errors of k image groups [B,...] that share `cond`, `timesteps` and `noise`; ONE forward of k·B."""
    k = len(images)
    errors = noise_pred_error(
        unet,
        scheduler,
        torch.cat(images),
        cat_cond([cond] * k),
        timesteps.repeat(k),
        noise.repeat(k, *[1] * (noise.dim() - 1)),
    )
    return list(errors.chunk(k))


# ---------------------------------------------------------------- sampling


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row: what a row draws then depends on its seed only, not on its batch."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample(
    unet,
    scheduler,
    cond,
    shape,
    steps: int = 20,
    sampler: str = "ddim",
    generator=None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    uncond=None,
):
    """Draw [B, *shape] by `steps` reverse steps of DDIM (`eta` = 0: deterministic) or DDPM, in the UNet's
    own space (pixels or latents: nothing is clipped here; a pixel-space caller clips, a latent caller
    decodes). `generator`: one generator, or a list with one per row (then each row's start noise and its
    DDPM/DDIM noise come from its own generator, so a row's sample does not depend on its batch);
    `noise` [B, *shape] replaces the drawn start noise.

    Classifier-free guidance as diffusers' pipelines do it: with `guidance_scale` > 1 and an `uncond`
    condition (e.g. the empty caption's embeddings), pred = pred(uncond) + scale·(pred(cond) − pred(uncond)),
    both from one batched forward. A fresh scheduler is built from `scheduler.config` each call.
    """
    schedulers = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if sampler not in schedulers:
        raise ValueError(f"sampler must be one of {sorted(schedulers)}, got {sampler!r}")
    sched = schedulers[sampler].from_config(scheduler.config)
    sched.set_timesteps(steps)
    batch = cond_rows(cond)
    device = next(unet.parameters()).device
    if noise is None:
        if isinstance(generator, list):
            noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generator])
        else:
            noise = torch.randn((batch, *shape), generator=generator)
    x = noise.to(device) * sched.init_noise_sigma
    guided = guidance_scale > 1.0 and uncond is not None
    both = cat_cond([uncond, cond]) if guided else None
    was_training = unet.training
    unet.eval()
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        if guided:
            out = unet_forward(unet, torch.cat([x_in, x_in]), t.expand(2 * batch).to(device), both)
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = unet_forward(unet, x_in, t.expand(batch).to(device), cond)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        x = sched.step(out, t, x, generator=generator, **kwargs).prev_sample
    unet.train(was_training)
    return x
