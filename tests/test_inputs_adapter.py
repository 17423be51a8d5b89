"""Starting from a trained LoRA adapter folder (issue 11, fault 13).

`model.name_or_path` = an SFT adapter (peft layout, `base_model_name_or_path` = the base folder). Right: the
policy starts as base + SFT adapter and the reference is that SFT model, for every reference strategy and with
`lora.enabled` true (the adapter is trained on) or false (merged, trained fully). The reference log-prob is
read back from the metrics at every step (log π_ref = logps − rewards / β, means over the one batch of all
records) and compared with a naive batch-1 forward of the SFT model built independently with peft."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from inputs_tiny import LN2, byte_bpe, dpo_config, gpt2, naive_logp, save, train, write_jsonl
from prefalign import runner
from prefalign.core.models import ModelConfig, load_trained

torch.set_num_threads(1)
BETA = 0.1


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """(adapter folder, pairs file, naive mean log p_SFT(chosen), naive mean log p_base(chosen))."""
    root = tmp_path_factory.mktemp("sft")
    tok = byte_bpe()
    base = save(gpt2(tok), tok, root / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    meta = json.loads((root / "adapter" / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = str(base)
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(meta))
    rows = [
        {"prompt": f"Is water wet {i}?", "chosen": " yes it is.", "rejected": " no, never."} for i in range(4)
    ]
    data = write_jsonl(root / "pairs.jsonl", rows)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), root / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()

    def mean_logp(m):
        values = [
            naive_logp(m, tok(r["prompt"])["input_ids"], tok(r["chosen"])["input_ids"] + [tok.eos_token_id])
            for r in rows
        ]
        return sum(values) / len(values)

    return root / "adapter", data, mean_logp(reference), mean_logp(plain)


@pytest.mark.parametrize(
    ("lora", "strategy"),
    [(True, "precompute"), (True, "frozen"), (True, "adapter"), (False, "precompute"), (False, "frozen")],
)
def test_policy_and_reference_are_the_sft_model(tmp_path, sft, lora, strategy):
    adapter, data, right, base_value = sft
    assert abs(right - base_value) > 0.1  # the adapter matters: losing it would show
    cfg = dpo_config(adapter, data, tmp_path / "run", **{
        "model.lora": {"enabled": lora},
        "model.reference.strategy": strategy,
        "train.max_steps": 3,
        "train.learning_rate": 1e-2,
        "loss.beta": BETA,
    })  # fmt: skip
    result = runner.run(runner.build_config(cfg))
    history = [h for h in result.history if "loss" in h]
    assert history[0]["logps/chosen"] == pytest.approx(right, abs=1e-4)
    assert history[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert history[-1]["logps/chosen"] - right > 1e-3  # the policy moved ...
    for h in history:  # ... and the reference stayed the SFT model
        assert h["logps/chosen"] - h["rewards/chosen"] / BETA == pytest.approx(right, abs=1e-3)
    final = tmp_path / "run" / "final"
    if lora:  # the trained adapter, without the frozen reference copy; it loads onto the base
        assert (final / "adapter_config.json").is_file() and not (final / "reference").exists()
        weights = load_file(final / "adapter_model.safetensors")
        assert not any("reference" in k for k in weights)
        policy, _ = load_trained(final, ModelConfig(name_or_path=str(adapter)))
        assert isinstance(policy, PeftModel)
    else:  # merged and fully trained: a plain model
        assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").is_file()


def test_adapter_strategy_reference_copy_stays_frozen(tmp_path, sft):
    adapter, data, right, _ = sft
    cfg = dpo_config(adapter, data, tmp_path / "run", **{
        "model.lora": {"enabled": True}, "model.reference.strategy": "adapter", "train.max_steps": 2,
    })  # fmt: skip
    model = runner.run(runner.build_config(cfg)).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert any(".reference." in n for n, _ in model.named_parameters())


def test_first_step_of_a_fresh_lora_is_still_the_base(tmp_path, sft):
    """Control: a fresh adapter (lora.enabled on a plain model folder) starts as the base model."""
    adapter, data, _, base_value = sft
    first = train(
        dpo_config(adapter.parent / "base", data, tmp_path / "run", **{"model.lora": {"enabled": True}})
    )
    assert first["logps/chosen"] == pytest.approx(base_value, abs=1e-4)
