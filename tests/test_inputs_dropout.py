"""Dropout off in policy and reference by default (issue 11, fault 6), with `model.dropout: true` to keep it.

Right value: at step 1 the policy IS the reference, so the DPO loss is exactly ln 2 and every reward 0. The
kind: every way a model applies dropout — nn.Dropout modules (GPT-2), a rate attribute the attention function
reads (Llama's `attention_dropout`), a rate read from the config inside forward (Falcon)."""

import json

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from inputs_tiny import LN2, byte_bpe, dpo_config, gpt2, save, train, write_jsonl
from prefalign.core.models import disable_dropout

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    """GPT-2 with GPT2Config's default dropout 0.1 (what real GPT-2 checkpoints ship), and 8 pairs."""
    path = tmp_path_factory.mktemp("dropout")
    tok = byte_bpe()
    save(gpt2(tok, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), tok, path / "model")
    rows = [
        {"prompt": f"Question {i}: is water wet?", "chosen": " yes it is.", "rejected": " no."}
        for i in range(8)
    ]
    return path / "model", write_jsonl(path / "pairs.jsonl", rows)


def test_step1_is_exactly_ln2_with_dropout_off_by_default(tmp_path, dropout_model):
    model_dir, data = dropout_model
    first = train(dpo_config(model_dir, data, tmp_path / "run", **{"train.batch_size": 8}))
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["resid_pdrop"] == config["attn_pdrop"] == 0.1  # the saved model keeps its own rates


def test_model_dropout_true_keeps_the_models_dropout(tmp_path, dropout_model):
    model_dir, data = dropout_model
    cfg = dpo_config(model_dir, data, tmp_path / "run", **{"train.batch_size": 8, "model.dropout": True})
    first = train(cfg)
    assert abs(first["loss"] - LN2) > 1e-5  # noisy log-ratios: what dropout does to DPO


def tiny(name, **rates):
    """A tiny random model of a transformers architecture with dropout rates set."""
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(**common, intermediate_size=64)),
        "falcon": ("FalconConfig", "FalconForCausalLM", common),
    }
    config_cls, model_cls, kwargs = configs[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, **rates)
    config._attn_implementation = "eager"
    return getattr(transformers, model_cls)(config)


@pytest.mark.parametrize(
    ("name", "rates"),
    [
        ("gpt2", dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)),  # nn.Dropout modules
        ("llama", dict(attention_dropout=0.5)),  # a module attribute the attention function reads
        ("falcon", dict(attention_dropout=0.5, hidden_dropout=0.5)),  # read from the config in forward
    ],
)
def test_disable_dropout_makes_training_mode_compute_the_eval_function(name, rates):
    model = tiny(name, **rates)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        noisy = model.train()(input_ids=ids).logits
        assert (noisy - expected).abs().max() > 1e-3  # the rates do act in training mode
        disable_dropout(model)
        got = model.train()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_lora_dropout_is_the_users_and_stays():
    model = get_peft_model(
        tiny("gpt2", resid_pdrop=0.5),
        LoraConfig(r=2, lora_dropout=0.3, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    disable_dropout(model)
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert rates and all((p == 0.3) == ("lora_dropout" in n) for n, p in rates.items())
