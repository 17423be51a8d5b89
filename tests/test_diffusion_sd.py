"""Stable Diffusion pipelines in and out: `prefalign train` on tiny random SD-1.5 and SDXL pipelines with a
Pick-a-Pic-like parquet, for Diffusion-DPO and SSPO, LoRA and full fine-tuning; the result loaded back into a
diffusers pipeline (load_lora_weights / UNet from_pretrained) computes exactly what was trained, and generates."""

import json

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiny_sd
from prefalign import runner
from prefalign.cli import app
from prefalign.core import pipelines
from prefalign.core.checkpoint import checkpoints
from prefalign.core.report import read_metrics

torch.set_num_threads(1)
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_sd.write_parquet(root / "pickapic.parquet", tiny_sd.pickapic_rows(10, ties=2))
    return {
        "sd15": tiny_sd.build_sd15(root),
        "sdxl": tiny_sd.build_sdxl(root),
        "data": root / "pickapic.parquet",
    }


def config(method, pipe, data, out, lora):
    cfg = {
        "method": method,
        "model": {"name_or_path": str(pipe), "lora": {"enabled": lora, "r": 4, "alpha": 8}},
        "data": {"train": str(data), "tie_policy": "skip", "caption_dropout": 0.25},
        "loss": {"beta": 5000.0},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3,
                  "lr_scheduler": "constant", "log_every": 1, "progress": False},
    }  # fmt: skip
    if method == "sspo":
        cfg["sspo"] = {"bank": {"save_every": 1}, "reference_sample": {"steps": 2}, "guidance_scale": 3.0}
    return cfg


def trained_as_prefalign_had_it(cfg, run_dir):
    """Independent of `final/`: the base with fresh adapters (same seed) and the last checkpoint's weights."""
    parts = pipelines.load_base(
        pipelines.DiffusionModelConfig(
            **{**cfg["model"], "lora": pipelines.LoraSettings(**cfg["model"]["lora"])}
        )
    )
    weights = load_file(checkpoints(run_dir)[-1] / "trainable.safetensors")
    params = dict(parts.unet.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return parts.unet.eval()


def unet_inputs(kind):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    if kind == "sd15":
        return x, t, {"encoder_hidden_states": torch.randn(2, 77, 16, generator=g)}
    added = {
        "text_embeds": torch.randn(2, 16, generator=g),
        "time_ids": torch.tensor([[20.0, 24, 2, 4, 16, 16]] * 2),
    }
    return x, t, {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g), "added_cond_kwargs": added}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("method", ["diffusion_dpo", "sspo"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_train_load_into_diffusers_and_generate(kind, method, lora, assets, tmp_path):
    cfg = config(method, assets[kind], assets["data"], tmp_path / "run", lora)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(
        torch.isfinite(torch.tensor(m["loss"])) for m in metrics
    )
    final = run / "final"
    cls = PIPELINES[kind]
    if lora:
        assert (final / "pytorch_lora_weights.safetensors").is_file() and not (final / "unet").exists()
        pipe = cls.from_pretrained(assets[kind])
        pipe.load_lora_weights(final)
    else:
        assert (final / "unet" / "config.json").is_file()
        pipe = cls.from_pretrained(assets[kind], unet=UNet2DConditionModel.from_pretrained(final / "unet"))
    card = (final / "README.md").read_text()  # the model card says how to load it
    assert ("load_lora_weights" if lora else "UNet2DConditionModel.from_pretrained") in card
    expected = trained_as_prefalign_had_it(cfg, run)
    base = cls.from_pretrained(assets[kind]).unet
    x, t, cond = unet_inputs(kind)
    with torch.no_grad():
        got, want, before = (net(x, t, **cond).sample for net in (pipe.unet, expected, base))
    assert (got - want).abs().max() < 1e-5, "the pipeline with the saved result computes what was trained"
    assert (want - before).abs().max() > 1e-4, "training moved the UNet"
    image = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(image)).all()
    evaluated = CliRunner().invoke(app, ["eval", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    numbers = json.loads((run / "eval.json").read_text())
    keys = (
        ["train_pairs/loss", "train_pairs/rewards/accuracies"]
        if method == "diffusion_dpo"
        else ["train_pairs/mse/chosen", "train_pairs/mse/chosen_base"]
    )
    assert all(torch.isfinite(torch.tensor(numbers[k])) for k in keys), numbers


def test_latent_cache_changes_speed_only_and_is_keyed(assets, tmp_path):
    """Latents encoded once (VAE posterior mean) and stored give the losses of encoding every batch (up to the
    float noise of encoding in batches of other sizes, which β = 5000 amplifies: measured 5.7e-5 relative at
    step 2); an identical run reads the stored file; other images (another resolution) compute a second one."""

    def run(name, **data):
        cfg = config("diffusion_dpo", assets["sdxl"], assets["data"], tmp_path / name, lora=True)
        cfg["data"].update(data)
        return read_metrics(runner.run(runner.build_config(cfg)).run_dir)

    cache = tmp_path / "cache"
    plain = run("plain")
    cached = run("cached", latent_cache=True, cache_dir=str(cache))
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in plain], rel=2e-4)
    (stored,) = cache.glob("latents-*/shard-00000.safetensors")
    stamp = stored.stat().st_mtime_ns
    again = run("again", latent_cache=True, cache_dir=str(cache))
    assert [m["loss"] for m in again] == [m["loss"] for m in cached] and stored.stat().st_mtime_ns == stamp
    run("smaller", latent_cache=True, cache_dir=str(cache), resolution=8)
    assert len(list(cache.glob("latents-*/done.json"))) == 2
