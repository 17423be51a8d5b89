"""Tiny random Stable Diffusion pipelines (SD-1.5-like and SDXL-like) and Pick-a-Pic-like data, built here
from configs and saved with `save_pretrained`; nothing is downloaded. Used by tests/test_diffusion_sd*.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from prefalign.worlds.digits_text import clip_text_encoder, clip_tokenizer

IMG = 16  # pixels; the 2-block VAE gives 8x8 latents
CAPTIONS = ["a red square", "a blue circle", "a green cat", "a yellow dog"]
WORDS = sorted({w for c in CAPTIONS for w in c.split()})


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random VAE whose scaling factor makes latents of random images unit-variance (SD's recipe), so
    they have SD's range: many values outside [-1, 1]."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=IMG,
    ).eval()  # fmt: skip
    with torch.no_grad():
        pixels = torch.rand(8, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )  # fmt: skip


def build_sd15(root: Path) -> Path:
    tokenizer = clip_tokenizer(root / "_vocab", WORDS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=IMG // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(tokenizer, 16, seed=0), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "sd15")
    return root / "sd15"


def build_sdxl(root: Path) -> Path:
    """SDXL's shape in small: two text encoders (the second with a projection), their states concatenated
    (16 + 16 = 32 = cross_attention_dim), pooled embeddings and six time ids through the `text_time` embedding."""
    tok1, tok2 = clip_tokenizer(root / "_vocab1", WORDS), clip_tokenizer(root / "_vocab2", WORDS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=IMG // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(tok1, 16, seed=1),
        text_encoder_2=clip_text_encoder(tok2, 16, seed=2, projection=16), tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler(),
    )  # fmt: skip
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_rows(n: int = 8, seed: int = 0, ties: int = 0) -> list[dict]:
    """Pick-a-Pic v2 rows: caption, jpg_0, jpg_1 (encoded bytes, not square, of other sizes than the model's),
    label_0 (1: image 0 won, 0: image 1 won); the last `ties` rows are ties (0.5)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        images = [png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(2)]
        label = 0.5 if i >= n - ties else float(i % 2)
        rows.append(
            {"caption": CAPTIONS[i % len(CAPTIONS)], "jpg_0": images[0], "jpg_1": images[1], "label_0": label}
        )
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
