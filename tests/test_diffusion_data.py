"""Diffusion data and model errors are one line naming the file, row and field (or the config key), before
training; images are resized and centre-cropped to the pipeline's resolution as the reference scripts do."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from prefalign import runner
from prefalign.core import images, pipelines
from prefalign.core.conditioning import Conditioner
from prefalign.core.errors import ConfigError, DataError
from prefalign.core.image_rows import prepare_image
from prefalign.methods import diffusion_dpo
from prefalign.worlds import digits_ddpm

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return tiny_sd.build_sd15(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def class_unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    digits_ddpm.build_digits_unet(digits_ddpm.DigitsDDPMConfig(channels=(8, 16))).save_pretrained(
        root / "unet"
    )
    digits_ddpm.build_scheduler(digits_ddpm.DigitsDDPMConfig()).save_pretrained(root / "scheduler")
    return root


def test_resize_and_centre_crop_like_torchvision():
    """A 20x40 (h x w) image to 10: the shorter side 20 -> 10 (scale 0.5), 40 -> 20, then the centre 10 columns:
    left = round((20 - 10) / 2) = 5. A left/right split image keeps its two colours on the two halves."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    pixels, original, crop = prepare_image(Image.fromarray(array), 3, 10, "x")
    assert original == (20, 40) and crop == (0, 5) and pixels.shape == (3, 10, 10)
    assert pixels[:, 5, 0].tolist() == [1.0, -1.0, -1.0] and pixels[:, 5, 9].tolist() == [-1.0, -1.0, 1.0]
    gray, _, _ = prepare_image(Image.fromarray(array), 1, None, "x")
    assert gray.shape == (1, 20, 40)


def test_sdxl_time_ids_come_from_the_winner_image(tmp_path):
    root = tmp_path / "sd"
    root.mkdir()
    parts = pipelines.load_parts(str(tiny_sd.build_sdxl(root)))
    path = tiny_sd.write_parquet(tmp_path / "p.parquet", tiny_sd.pickapic_rows(2))
    item = images.load_image_data(path, parts=parts)[0]
    # 20 x 24 images to 16: 24 * 16 / 20 = 19.2 -> 19 wide, crop left round(3 / 2) = 2
    assert item["time_ids"].tolist() == [20.0, 24.0, 0.0, 2.0, 16.0, 16.0] and item["chosen"].shape == (
        3,
        16,
        16,
    )


def test_config_and_model_errors_are_one_line(sd15, class_unet, tmp_path, monkeypatch):
    def setup_error(cfg):
        cfg = {"method": "diffusion_dpo", **cfg, "train": {"output_dir": str(tmp_path / "r"), "max_steps": 1}}
        with pytest.raises((ConfigError, DataError)) as caught:
            runner.run(runner.build_config(cfg))
        assert "\n" not in str(caught.value) and not (tmp_path / "r").exists()
        return str(caught.value)

    data = tmp_path / "x.npz"  # exists (a missing data path is refused before the model: test_inputs_errors)
    data.write_bytes(b"")
    assert "model path not found" in setup_error(
        {"model": {"name_or_path": str(tmp_path / "nope")}, "data": {"train": str(data)}}
    )

    def offline(*args, **kwargs):  # what huggingface_hub raises without a network (no real request in tests)
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load this file.\nCheck your connection."
        )

    with monkeypatch.context() as patched:
        patched.setattr(pipelines.StableDiffusionPipeline, "load_config", offline)
        assert "could not read 'someone/no-such-pipeline' from the hub: We couldn't connect" in setup_error(
            {"model": {"name_or_path": "someone/no-such-pipeline"}, "data": {"train": str(data)}}
        )
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "labels.npz", chosen=rng.random((4, 3, 16, 16), dtype=np.float32),
             rejected=rng.random((4, 3, 16, 16), dtype=np.float32), context=np.arange(4))  # fmt: skip
    message = setup_error(
        {"model": {"name_or_path": str(sd15)}, "data": {"train": str(tmp_path / "labels.npz")}}
    )
    assert "labels.npz: field 'context': the model is a text-conditioned pipeline; give captions" in message
    np.savez(tmp_path / "captions.npz", chosen=rng.random((4, 1, 8, 8), dtype=np.float32),
             rejected=rng.random((4, 1, 8, 8), dtype=np.float32), caption=np.array(["a 1"] * 4))  # fmt: skip
    message = setup_error(
        {"model": {"name_or_path": str(class_unet)}, "data": {"train": str(tmp_path / "captions.npz")}}
    )
    assert "field 'caption': the model has no text encoder" in message
    message = setup_error({"method": "sspo", "model": {"name_or_path": str(class_unet)},
                           "data": {"train": str(tmp_path / "labels.npz")}, "sspo": {"guidance_scale": 3.0}})  # fmt: skip
    assert "sspo.guidance_scale" in message
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("L", (8, 8), 0).save(folder / "a.png")
    (folder / "pairs.csv").write_text("chosen,rejected,label\na.png,a.png,3\na.png,a.png,12\n")
    message = setup_error({"model": {"name_or_path": str(class_unet)}, "data": {"train": str(folder)}})
    assert message.endswith(
        "pairs.csv: row 3, field 'label': class 12 out of range; the UNet has classes 0..9"
    )
    (folder / "pairs.csv").write_text("chosen,rejected,label\na.png,b.png,3\n")
    message = setup_error({"model": {"name_or_path": str(class_unet)}, "data": {"train": str(folder)}})
    assert "pairs.csv: row 2, field 'rejected': no image file" in message


def test_ties_skipped_are_counted(sd15, tmp_path, caplog):
    path = tiny_sd.write_parquet(tmp_path / "p.parquet", tiny_sd.pickapic_rows(6, ties=2))
    parts = pipelines.load_parts(str(sd15))
    dataset = images.load_image_data(
        path, parts=parts, data=images.ImageDataConfig(train=str(path), tie_policy="skip")
    )
    assert len(dataset) == 4 and "loaded 4 of 6 rows; skipped {'tie': 2}" in caplog.text


def test_sspo_takes_the_winner_of_each_pickapic_row(sd15, tmp_path):
    rows = tiny_sd.pickapic_rows(4)
    path = tiny_sd.write_parquet(tmp_path / "p.parquet", rows)
    parts = pipelines.load_parts(str(sd15))
    winners = images.load_image_data(path, need_rejected=False, parts=parts)
    pairs = images.load_image_data(path, parts=parts)
    for i, row in enumerate(rows):
        assert "rejected" not in winners[i] and torch.equal(winners[i]["chosen"], pairs[i]["chosen"])
        won = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
        expected, _, _ = prepare_image(Image.open(io.BytesIO(won)), 3, 16, "x")
        assert torch.equal(winners[i]["chosen"], expected)
    table = tmp_path / "winners.csv"
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "g.png")
    table.write_text("image,caption\ng.png,a green cat\n")
    only = images.load_image_data(table, need_rejected=False, parts=parts)
    assert only[0]["caption"] == "a green cat" and only[0]["chosen"][:, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    with pytest.raises(DataError, match="no image columns I know"):
        images.load_image_data(table, parts=parts)  # pairs needed for Diffusion-DPO


def test_gradient_checkpointing_changes_memory_not_results(sd15, tmp_path):
    path = tiny_sd.write_parquet(tmp_path / "p.parquet", tiny_sd.pickapic_rows(4))
    grads, losses = [], []
    for checkpointing in (False, True):
        model = pipelines.DiffusionModelConfig(name_or_path=str(sd15), gradient_checkpointing=checkpointing)
        parts = pipelines.load_base(model)
        assert parts.unet.is_gradient_checkpointing == checkpointing
        data = images.load_image_data(path, parts=parts)
        batch = images.collate_images([data[i] for i in range(4)])
        step = diffusion_dpo.make_step(
            parts.scheduler, diffusion_dpo.make_reference(parts.unet, "frozen"), 5000.0, Conditioner(parts)
        )
        with torch.no_grad():  # a policy different from the reference
            parts.unet.conv_out.weight.mul_(1.1)
        torch.manual_seed(0)
        loss, _ = step(parts.unet, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(parts.unet.conv_in.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_datasets_folders_with_binary_or_image_columns(sd15, tmp_path):
    """A `datasets` save_to_disk folder reads like the parquet: binary image columns, or an Image feature
    (values come back as PIL images), with a `columns:` rename of the user's names."""
    import datasets

    rows = tiny_sd.pickapic_rows(4)
    parts = pipelines.load_parts(str(sd15))
    expected = images.load_image_data(tiny_sd.write_parquet(tmp_path / "p.parquet", rows), parts=parts)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "binary"))
    renamed = [
        {"prompt_text": r["caption"], "img_a": r["jpg_0"], "img_b": r["jpg_1"], "pref": r["label_0"]}
        for r in rows
    ]
    features = datasets.Features({"prompt_text": datasets.Value("string"), "img_a": datasets.Image(),
                                  "img_b": datasets.Image(), "pref": datasets.Value("float32")})  # fmt: skip
    with_images = [
        {**r, "img_a": {"bytes": r["img_a"], "path": None}, "img_b": {"bytes": r["img_b"], "path": None}}
        for r in renamed
    ]
    datasets.Dataset.from_list(with_images, features=features).save_to_disk(str(tmp_path / "images"))
    columns = {"prompt_text": "caption", "img_a": "jpg_0", "img_b": "jpg_1", "pref": "label_0"}
    for folder, cols in (("binary", {}), ("images", columns)):
        path = tmp_path / folder
        data = images.load_image_data(
            path, parts=parts, data=images.ImageDataConfig(train=str(path), columns=cols)
        )
        for i in range(len(rows)):
            assert data[i]["caption"] == expected[i]["caption"]
            assert torch.equal(data[i]["chosen"], expected[i]["chosen"]) and torch.equal(
                data[i]["rejected"], expected[i]["rejected"]
            )


def test_another_vae_replaces_the_pipelines(sd15, tmp_path):
    """`model.vae` (like madebyollin/sdxl-vae-fp16-fix for SDXL): the given VAE is the one used."""
    other = tiny_sd.tiny_vae(seed=3)
    other.save_pretrained(tmp_path / "vae")
    parts = pipelines.load_parts(
        pipelines.DiffusionModelConfig(name_or_path=str(sd15), vae=str(tmp_path / "vae"))
    )
    assert all(
        torch.equal(a, b) for a, b in zip(parts.vae.state_dict().values(), other.state_dict().values())
    )
    with pytest.raises(ConfigError, match="config key 'model.vae': could not load"):
        pipelines.load_parts(
            pipelines.DiffusionModelConfig(name_or_path=str(sd15), vae=str(tmp_path / "none"))
        )
