"""The digits world as a text-to-image problem: a tiny Stable-Diffusion-style pipeline with ground truth.

"a handwritten 3" goes through a tiny CLIP text encoder (random, frozen: it only has to tell ten captions
apart), a tiny latent UNet denoises 4x4x4 latents of a tiny VAE trained on the 8x8 digits, and the world's
held-out evaluator (never the judge) scores decoded samples. Everything is built from configs, trained once
(about a minute on a CPU core), saved with `StableDiffusionPipeline.save_pretrained` and cached under
`$PREFALIGN_CACHE/digits_text/<config hash>/` (default `~/.cache/prefalign`), written atomically.

Registers `world:digits-text` and `world:digits-text-quick` (kind "diffusion": a pipeline, judged by the
evaluator) and `world:digits-text-judge` (pairs: two samples per caption ordered by the judge, as images
with their captions, so training goes through the VAE and the text encoder like Pick-a-Pic data).
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
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from prefalign.core import console, sources
from prefalign.core.conditioning import Conditioner
from prefalign.core.diffusion import draw_timesteps_and_noise, noise_pred_error, row_generators, sample
from prefalign.core.images import to_model_space, to_pixel_space
from prefalign.core.pipelines import DiffusionParts, load_parts
from prefalign.worlds.digits import load_digits_split, make_world

CAPTION = "a handwritten {}"


def caption(label: int) -> str:
    return CAPTION.format(int(label))


# ---------------------------------------------------------------- a CLIP tokenizer built here, no download


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def clip_tokenizer(folder: Path, words: list[str], max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer: every byte (alone and word-final) plus merges that make each of
    `words` one token; written to `folder` (vocab.json, merges.txt) and loaded by transformers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def clip_text_encoder(tokenizer, hidden: int, seed: int, projection: int | None = None):
    """A random tiny CLIP text encoder for `tokenizer` (with a text projection when `projection` is set)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


# ---------------------------------------------------------------- the base pipeline


@dataclass
class DigitsTextConfig:
    """The text-to-digits pipeline: a VAE (8x8x1 -> 4x4x4) and a cross-attention UNet, each trained briefly,
    so the base is deliberately mediocre and preferences can help. `quick` shrinks training."""

    text_hidden: int = 32
    max_length: int = 16
    vae_channels: tuple[int, int] = (16, 32)
    vae_steps: int = 600
    vae_kl_weight: float = 1e-4
    unet_channels: tuple[int, int] = (32, 64)
    unet_steps: int = 1500
    caption_dropout: float = 0.1  # so classifier-free guidance has an unconditional model to use
    batch_size: int = 64
    learning_rate: float = 2e-3
    world_seed: int = 0
    seed: int = 0
    version: int = 1  # raise when the recipe changes in a way the fields above do not show

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK_TEXT = DigitsTextConfig(vae_steps=400, unet_steps=800)


def _train(module, steps: int, lr: float, loss_fn, desc: str, progress: bool) -> None:
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    module.train()
    bar = tqdm(range(steps), desc=desc, disable=not (progress and console.bars()), leave=False)
    for step in bar:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    module.eval()


def build_pipeline(cfg: DigitsTextConfig, folder: Path, progress: bool = True) -> StableDiffusionPipeline:
    """Train the VAE, then the UNet on its latents with the encoded class captions; save the pipeline."""
    data = load_digits_split(cfg.world_seed)["train"]
    x_all, y_all = to_model_space(data["images"]), data["labels"]
    generator = torch.Generator().manual_seed(cfg.seed)
    tokenizer = clip_tokenizer(Path(folder) / "_vocab", ["a", "handwritten"], cfg.max_length)
    text_encoder = clip_text_encoder(tokenizer, cfg.text_hidden, cfg.seed)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=tuple(cfg.vae_channels),
        latent_channels=4, norm_num_groups=8, sample_size=8,
    )  # fmt: skip

    def vae_loss(_):
        x = x_all[torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return (
            torch.nn.functional.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean() / x[0].numel()
        )

    _train(vae, cfg.vae_steps, cfg.learning_rate, vae_loss, "digits-text VAE", progress)
    with torch.no_grad():
        means = vae.encode(x_all).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))  # unit-variance latents, SD's recipe
    latents = means * vae.config.scaling_factor

    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    with torch.no_grad():  # captions 0..9, then the empty caption (index 10) for dropout
        texts = pipe.encode_prompt([caption(d) for d in range(10)] + [""], "cpu", 1, False)[0]

    def unet_loss(_):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=generator)
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        cond = texts[torch.where(drop, 10, y_all[idx])]
        timesteps, noise = draw_timesteps_and_noise(scheduler, latents[idx], generator)
        return noise_pred_error(unet, scheduler, latents[idx], cond, timesteps, noise).mean()

    _train(unet, cfg.unet_steps, cfg.learning_rate, unet_loss, "digits-text UNet", progress)
    pipe.save_pretrained(folder)
    shutil.rmtree(Path(folder) / "_vocab", ignore_errors=True)
    (Path(folder) / "digits_text_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return pipe


def pipeline_path(quick: bool = False, cfg: DigitsTextConfig | None = None, progress: bool = True) -> Path:
    """The cached pipeline folder (trained on first use, written atomically)."""
    cfg = cfg or (QUICK_TEXT if quick else DigitsTextConfig())
    path = sources.cache_root() / "digits_text" / cfg.key()
    if not (path / "model_index.json").is_file():
        name = "world:digits-text" + ("-quick" if cfg == QUICK_TEXT else "")
        console.say(
            f"{name}: first use on this machine: training its VAE, text encoder and UNet, cached in {path}"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        build_pipeline(cfg, tmp, progress)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_digits_text(quick: bool = False, progress: bool = True) -> DiffusionParts:
    return load_parts(str(pipeline_path(quick, progress=progress)))


# ---------------------------------------------------------------- sampling, judging, evaluating


@torch.no_grad()
def sample_digits(parts: DiffusionParts, labels, steps: int = 20, guidance_scale: float = 1.0, seed: int = 0):
    """Digits for the captions of `labels`, decoded to pixels [0, 1], shape [N, 1, 8, 8]. Row i draws from its
    own generator (seed, i), so a sample does not depend on the batch it is drawn in."""
    conditioner = Conditioner(parts)
    labels = torch.as_tensor(labels)
    cond = conditioner.encode([caption(d) for d in labels.tolist()])
    uncond = conditioner.unconditional(cond) if guidance_scale > 1 else None
    generators = row_generators([seed * 1_000_003 + i for i in range(len(labels))])
    latents = sample(
        parts.unet, parts.scheduler, cond, parts.model_shape(), steps=steps, generator=generators,
        guidance_scale=guidance_scale, uncond=uncond,
    )  # fmt: skip
    vae = parts.vae
    pixels = vae.decode(latents.to(next(vae.parameters()).device) / vae.config.scaling_factor).sample
    return to_pixel_space(pixels.float().cpu())


def judge_labelled_pairs(parts, n_pairs: int, world_seed: int = 0, steps: int = 20, seed: int = 0):
    """Two base samples per caption, ordered by the digits world's judge. Returns numpy arrays chosen/rejected
    [N, 1, 8, 8] in [0, 1], caption [N] and the judge's scores."""
    judge = make_world(world_seed).judge
    labels = torch.arange(n_pairs) % 10
    a = sample_digits(parts, labels, steps=steps, seed=2 * seed)
    b = sample_digits(parts, labels, steps=steps, seed=2 * seed + 1)
    score_a, score_b = judge(a, labels), judge(b, labels)
    a_wins = (score_a >= score_b).view(-1, 1, 1, 1)
    return {
        "chosen": torch.where(a_wins, a, b).numpy(),
        "rejected": torch.where(a_wins, b, a).numpy(),
        "caption": [caption(d) for d in labels.tolist()],
        "judge_chosen": torch.maximum(score_a, score_b).numpy(),
        "judge_rejected": torch.minimum(score_a, score_b).numpy(),
    }


def evaluate(
    parts,
    samples_per_class: int = 50,
    steps: int = 20,
    guidance_scale: float = 1.0,
    seed: int = 1234,
    world_seed: int = 0,
) -> dict:
    """Held-out evaluator's mean probability of the captioned class, and diversity, on fresh samples."""
    world = make_world(world_seed)
    labels = torch.arange(10).repeat(samples_per_class)
    x = sample_digits(parts, labels, steps=steps, guidance_scale=guidance_scale, seed=seed)
    return {"score": float(world.score(x, labels).mean()), "diversity": float(world.diversity(x, labels))}


def _judge_pairs(parts, n_pairs: int = 1000, sample_steps: int = 20, seed: int = 0) -> dict:
    arrays = judge_labelled_pairs(parts, n_pairs, 0, sample_steps, seed=seed)
    return {k: arrays[k] for k in ("chosen", "rejected", "caption")}


sources.register("world:digits-text", "diffusion", lambda: load_digits_text(quick=False), evaluate,
                 "the digits world as text-to-image: a tiny CLIP + VAE + latent UNet pipeline (trained once, cached)")  # fmt: skip
sources.register("world:digits-text-quick", "diffusion", lambda: load_digits_text(quick=True), evaluate,
                 "a shorter-trained digits text-to-image pipeline, for tests and quick demos")  # fmt: skip
sources.register("world:digits-text-judge", "pairs", _judge_pairs,
                 description="pairs of base samples per caption ordered by the digits world's judge (AI feedback)")  # fmt: skip
