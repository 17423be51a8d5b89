"""A batch of image data -> what the UNet takes: images in its space and its condition.

- Images: a pipeline's VAE encodes pixels [-1, 1] to latents `(mean − shift) · scaling_factor` (the VAE
  posterior's mean, so encoding is deterministic and the optional latent cache changes speed only; the
  reference scripts draw `latent_dist.sample()` instead). Arrays already holding latents pass through.
  The VAE runs in float32 (outside autocast), as the reference scripts keep it.
- Captions go through the pipeline's own `encode_prompt` (SD: the text encoder's last hidden state; SDXL:
  both encoders' penultimate states concatenated, the pooled projection of the second, and the six time ids
  original size + crop top-left + target size, as `StableDiffusionXLPipeline` builds them). During training
  a fraction `caption_dropout` of captions is replaced by "" (the reference scripts' empty-prompt dropout),
  drawn from the global RNG (so checkpoints resume it exactly).
- The unconditional condition for classifier-free guidance is the pipeline's: the empty caption's encoding
  (SD), or zeros when an SDXL pipeline says `force_zeros_for_empty_prompt`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prefalign.core.data_arrow import cache_dir as data_cache_dir
from prefalign.core.errors import ConfigError
from prefalign.core.images import ImageDataset, collate_images
from prefalign.core.reference import weights_hash

ENCODE_BATCH = 8  # images per VAE call (the reference scripts' vae_encode_batch_size)


class Conditioner:
    def __init__(self, parts, caption_dropout: float = 0.0):
        self.parts, self.caption_dropout = parts, caption_dropout
        self.pipe = parts.pipeline() if parts.text_encoders else None
        self._empty = None

    # ------------------------------------------------------------ images

    def is_latent(self, x: torch.Tensor) -> bool:
        vae = self.parts.vae
        return vae is None or (x.shape[1] == self.parts.unet.config.in_channels != vae.config.in_channels)

    @torch.no_grad()
    def model_images(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> latents through the VAE (a pixel-space UNet, or latents given: unchanged)."""
        if self.is_latent(x):
            return x
        vae = self.parts.vae
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        with torch.autocast(x.device.type, enabled=False):
            pixels = x.to(next(vae.parameters()).device, torch.float32)
            means = [vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(ENCODE_BATCH)]
        return ((torch.cat(means) - shift) * config.scaling_factor).to(x.device)

    # ------------------------------------------------------------ conditions

    @property
    def device(self):
        module = self.parts.text_encoders[0] if self.parts.text_encoders else self.parts.unet
        return next(module.parameters()).device

    def time_ids(self, batch: dict, n: int) -> torch.Tensor:
        """SDXL's size conditioning: the batch's own (decoded tables), else uncropped images of the batch's
        size (arrays: pixels, or latents times the VAE's downscaling)."""
        if "time_ids" in batch:
            return batch["time_ids"].float()
        x = batch["chosen"]
        scale = self.parts.vae_scale if self.is_latent(x) else 1
        h, w = (float(d * scale) for d in x.shape[-2:])
        return torch.tensor([[h, w, 0.0, 0.0, h, w]] * n)

    @torch.no_grad()
    def encode(self, captions: list[str], time_ids: torch.Tensor | None = None):
        """Captions -> the UNet's condition: [B, L, D] embeddings, or SDXL's dict."""
        if self.pipe is None:
            raise ConfigError(
                "captions need a text-conditioned pipeline (model.name_or_path with text encoders)"
            )
        with torch.autocast(self.device.type, enabled=False):
            out = self.pipe.encode_prompt(
                prompt=captions,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        if self.parts.conditioning != "sdxl":
            return out[0]
        if time_ids is None:  # the pipeline's default: uncropped images of its resolution
            size = float(self.parts.resolution)
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * len(captions))
        return {
            "encoder_hidden_states": out[0],
            "added_cond_kwargs": {"text_embeds": out[2], "time_ids": time_ids.to(out[0].device)},
        }

    def condition(self, batch: dict):
        """The batch's condition: its captions encoded, or its `context` (labels or embeddings)."""
        if "caption" not in batch:
            return batch["context"]
        captions = list(batch["caption"])
        return self.encode(
            captions, self.time_ids(batch, len(captions)) if self.parts.conditioning == "sdxl" else None
        )

    def drop_captions(self, cond):
        """Training-time caption dropout: each row's condition becomes the empty caption's with probability
        `caption_dropout` (exactly what encoding "" for that row gives; SDXL keeps the row's time ids)."""
        if self.caption_dropout <= 0:
            return cond
        if self.pipe is None:
            raise ConfigError(
                "config key 'data.caption_dropout' needs captions and a text-conditioned pipeline"
            )
        n = len(cond["encoder_hidden_states"]) if isinstance(cond, dict) else len(cond)
        dropped = (torch.rand(n) < self.caption_dropout).to(self.device)
        empty = self._empty_caption()

        def pick(full, blank):
            mask = dropped.view(-1, *[1] * (full.dim() - 1))
            return torch.where(mask, blank.to(full.device).expand_as(full), full)

        if not isinstance(cond, dict):
            return pick(cond, empty)
        added = cond["added_cond_kwargs"]
        return {
            "encoder_hidden_states": pick(cond["encoder_hidden_states"], empty["encoder_hidden_states"]),
            "added_cond_kwargs": {
                **added,
                "text_embeds": pick(added["text_embeds"], empty["added_cond_kwargs"]["text_embeds"]),
            },
        }

    @torch.no_grad()
    def unconditional(self, cond):
        """The pipeline's negative condition for classifier-free guidance, shaped like `cond` (None without text)."""
        if self.pipe is None:
            return None
        n = len(cond["encoder_hidden_states"]) if isinstance(cond, dict) else len(cond)
        if self.parts.conditioning == "sdxl":
            if self.parts.pipeline_config.get("force_zeros_for_empty_prompt", True):
                hidden, pooled = (
                    torch.zeros_like(cond["encoder_hidden_states"]),
                    torch.zeros_like(cond["added_cond_kwargs"]["text_embeds"]),
                )
            else:
                empty = self._empty_caption()
                hidden = empty["encoder_hidden_states"].expand(n, -1, -1)
                pooled = empty["added_cond_kwargs"]["text_embeds"].expand(n, -1)
            time_ids = cond["added_cond_kwargs"]["time_ids"]
            return {
                "encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
            }
        return self._empty_caption().expand(n, -1, -1)

    def _empty_caption(self):
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def inputs(self, batch: dict, train: bool = False) -> dict:
        """{"chosen", "rejected" (if present): images in the UNet's space, "cond": the condition (with caption
        dropout when `train`)}."""
        out = {k: self.model_images(batch[k]) for k in ("chosen", "rejected") if k in batch}
        cond = self.condition(batch)
        out["cond"] = self.drop_captions(cond) if train else cond
        return out


# ---------------------------------------------------------------- the latent cache

SHARD_ROWS = 1024  # rows per latent shard: what one write holds in memory


def _reference(ref) -> bytes:
    """What identifies one image reference without decoding it: a file's path, size and modification time;
    the bytes of an embedded image; the pixels of an in-memory one."""
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(bytes(ref), digest_size=16).digest()
    if isinstance(ref, (str, Path)):
        stat = Path(ref).stat()
        return f"{Path(ref).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    if torch.is_tensor(ref):
        return f"{tuple(ref.shape)}|{ref.dtype}".encode() + ref.contiguous().numpy().tobytes()
    return repr((getattr(ref, "size", None), getattr(ref, "mode", None))).encode() + ref.tobytes()  # PIL


def _data_key(dataset, fields: list[str]) -> str:
    """Hash of what the VAE would see, without decoding an image: the image references of a table (files by
    path, size and modification time; embedded bytes by content) with the decoding settings, or the pixels of
    in-memory arrays."""
    digest = hashlib.blake2b(digest_size=16)
    images = dataset.images
    if images is not None:  # references decoded on access (core.image_rows.TableImages)
        digest.update(f"{type(images).__name__}|{images.channels}|{images.resolution}".encode())
    for name in fields:
        column = dataset.data[name]
        if torch.is_tensor(column):
            digest.update(f"{name}|{tuple(column.shape)}|{column.dtype}".encode())
            digest.update(column.contiguous().numpy().tobytes())
            continue
        for ref in column:
            digest.update(name.encode() + _reference(ref))
    return digest.hexdigest()


class LatentColumn:
    """One column of the latent cache, read row by row from memory-mapped safetensors shards (never loaded
    whole): `column[i]` -> a tensor. Pickles as its file names (DataLoader workers map the same files)."""

    def __init__(self, shards: list[Path], rows: list[int], name: str):
        self.shards, self.name = [Path(p) for p in shards], name
        self.starts = torch.tensor([0, *rows]).cumsum(0).tolist()
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        i = range(len(self))[i]
        shard = bisect.bisect_right(self.starts, i) - 1
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.shards[shard]), framework="pt")
        return self._open[shard].get_slice(self.name)[i - self.starts[shard]]

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}


def cache_latents(
    dataset: ImageDataset,
    conditioner: Conditioner,
    cache_dir=None,
    batch_size: int = 16,
    shard_rows: int = SHARD_ROWS,
) -> ImageDataset:
    """The dataset with its images replaced by their VAE latents, computed once and stored under `cache_dir` as
    `latents-<key>/shard-NNNNN.safetensors` (`shard_rows` rows each, each written atomically, so an
    interrupted build resumes at its first missing shard) and `done.json`; the latents are read memory-mapped,
    row by row. The key hashes the images as `_data_key` identifies them (no decoding), the VAE's weights and
    its scaling: other data, another VAE or another resolution compute afresh; an identical run, any run,
    reads the shards. `cache_dir` None: the data cache's `latents/` (`core.data_arrow.cache_dir`), shared by
    every run."""
    vae = conditioner.parts.vae
    if vae is None:
        return dataset
    fields = [k for k in ("chosen", "rejected") if k in dataset.data]
    config = vae.config
    key = hashlib.blake2b(
        f"{_data_key(dataset, fields)}|{weights_hash(vae)}|mean|{config.scaling_factor}|{getattr(config, 'shift_factor', None)}".encode(),
        digest_size=16,
    ).hexdigest()
    folder = Path(cache_dir or data_cache_dir() / "latents") / f"latents-{key}"
    shards = [folder / f"shard-{k:05d}.safetensors" for k in range(-(-len(dataset) // shard_rows))]
    if not (folder / "done.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(shards):
            if not path.is_file():
                rows = range(k * shard_rows, min((k + 1) * shard_rows, len(dataset)))
                _write_shard(path, dataset, rows, conditioner, fields, batch_size)
        done = folder / f".tmp-{os.getpid()}-done.json"
        done.write_text(json.dumps({"rows": len(dataset), "shards": len(shards), "shard_rows": shard_rows}))
        os.replace(done, folder / "done.json")
    sizes = [min(shard_rows, len(dataset) - k * shard_rows) for k in range(len(shards))]
    columns = {k: v for k, v in dataset.data.items() if k not in fields}
    latents = {name: LatentColumn(shards, sizes, name) for name in [*fields, "time_ids"]}
    return ImageDataset({**columns, **latents})


def _write_shard(path: Path, dataset, rows: range, conditioner, fields, batch_size: int) -> None:
    stored = {name: [] for name in [*fields, "time_ids"]}
    for start in range(rows.start, rows.stop, batch_size):
        batch = collate_images([dataset[i] for i in range(start, min(start + batch_size, rows.stop))])
        for name in fields:
            stored[name].append(conditioner.model_images(batch[name].to(conditioner.device)).cpu())
        stored["time_ids"].append(conditioner.time_ids(batch, len(batch["chosen"])))
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({name: torch.cat(values).contiguous() for name, values in stored.items()}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run reads a whole shard or none
