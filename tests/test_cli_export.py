"""Outputs people can use: the model card in final/, `prefalign export` (a LoRA adapter whose base resolves
from anywhere, a merged model, a checkpoint), each opened by from_pretrained from another directory."""

import json
import os
import shutil

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from prefalign.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def in_dir(tmp_path):
    """Run inside tmp_path/work (relative paths in the config), restoring the working directory after."""
    work = tmp_path / "work"
    work.mkdir()
    here = os.getcwd()
    os.chdir(work)
    yield work
    os.chdir(here)


def train(work, tiny_lm, pairs_file, lora: bool, **train_settings):
    """A run whose config names the model and data by RELATIVE paths (as users write them)."""
    shutil.copytree(tiny_lm, work / "tiny-lm")
    pairs_file(work / "d.jsonl", 40)
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": "tiny-lm", "lora": {"enabled": lora, "r": 2, "alpha": 4}},
        "data": {"train": "d.jsonl", "max_length": 24, "max_prompt_length": 8},
        "train": {"output_dir": "runs/x", "max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
                  "log_every": 2, **train_settings},
    }  # fmt: skip
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("train", "cfg.yaml")
    assert result.exit_code == 0, result.output
    return work / "runs" / "x"


def logits(model, ids=(5, 9, 1, 40, 7)):
    with torch.no_grad():
        return model.eval()(torch.tensor([list(ids)])).logits


def test_lora_export_merged_and_adapter_open_from_another_directory(in_dir, tiny_lm, pairs_file, tmp_path):
    """The adapter records the absolute base path (the config said `tiny-lm`, relative). From another working
    directory: the merged export opens with AutoModelForCausalLM, the adapter export with
    AutoPeftModelForCausalLM, and both give the same logits. One merged weight is checked by hand:
    W + (alpha / r) * (B @ A)^T (GPT-2's Conv1D stores [in, out]); the adapter moved it (B != 0 after training)."""
    run = train(in_dir, tiny_lm, pairs_file, lora=True)
    adapter_config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((in_dir / "tiny-lm").resolve())
    assert invoke("export", run, "out-merged", "--merge-lora").exit_code == 0
    assert invoke("export", run, "out-adapter").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    merged = AutoModelForCausalLM.from_pretrained(in_dir / "out-merged")
    adapter = AutoPeftModelForCausalLM.from_pretrained(in_dir / "out-adapter")
    torch.testing.assert_close(logits(merged), logits(adapter), atol=1e-5, rtol=0)

    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    weights = load_file(run / "final" / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
    assert b.abs().max() > 0
    expected = base.transformer.h[0].attn.c_attn.weight + (4 / 2) * (b @ a).T
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight, expected, atol=1e-6, rtol=0)
    card = (in_dir / "out-merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM" in card
    assert "library_name: peft" in (in_dir / "out-adapter" / "README.md").read_text()


def test_full_run_model_card_and_checkpoint_export(in_dir, tiny_lm, pairs_file):
    """final/README.md names base model, method, loss, data, steps and the end-of-training eval numbers
    (those of summary.json). `export --step 2` writes checkpoint 2's weights as a from_pretrained folder:
    its tensors equal the checkpoint's trainable.safetensors; the final export equals final/."""
    run = train(in_dir, tiny_lm, pairs_file, lora=False, save_every=2)
    card = (run / "final" / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for needle in ("`tiny-lm`", "dpo", "`d.jsonl`", "4 optimizer steps", "full fine-tuning",
                   f"| loss | {summary['eval']['loss']:.4g} |"):  # fmt: skip
        assert needle in card, needle
    assert invoke("export", run, "at-2", "--step", 2).exit_code == 0
    exported = AutoModelForCausalLM.from_pretrained(in_dir / "at-2").state_dict()
    saved = load_file(run / "checkpoints" / "step-2" / "trainable.safetensors")
    assert saved
    for name, tensor in saved.items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0)
    assert invoke("export", run, "final-copy").exit_code == 0
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(in_dir / "final-copy")), logits(final)
    )
    assert not torch.allclose(logits(final), logits(AutoModelForCausalLM.from_pretrained(in_dir / "at-2")))


def test_export_refuses_what_it_cannot_do(in_dir, tiny_lm, pairs_file):
    run = train(in_dir, tiny_lm, pairs_file, lora=False)
    (in_dir / "full").mkdir()
    (in_dir / "full" / "x").write_text("x")
    busy = invoke("export", run, "full")
    assert busy.exit_code == 2 and "not empty" in busy.output
    missing = invoke("export", run, "out", "--step", 3)
    assert missing.exit_code == 2 and "checkpoints: step-4" in missing.output
