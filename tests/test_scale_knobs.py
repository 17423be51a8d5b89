"""Scale knobs change memory and speed, never the numbers: gradient checkpointing gives the same loss curve
(packed and padded, on a sliding-window model too); bf16 mixed precision stays within bf16 rounding of
float32. Their speed and memory are measured in benchmarks/dpo_vs_trl.py, not here."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from prefalign import runner
from prefalign.core.data import PreferenceRecord
from prefalign.methods import dpo
from prefalign.worlds.reviews import build_tokenizer

torch.set_num_threads(1)
TOKENIZER = build_tokenizer()  # once: the same token ids in every run compared


def data(tokenizer, n=12):
    words = [w for w in sorted(tokenizer.get_vocab()) if w.isalpha()][:12]
    g = torch.Generator().manual_seed(0)

    def text(k):
        return " ".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist())

    return [PreferenceRecord.pair(text(6), text(9), text(5)) for _ in range(n)]


def model(name, vocab):
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def curve(tmp_path, name, tag, **train):
    tokenizer = TOKENIZER
    cfg = dpo.Config()
    cfg.train.output_dir = str(tmp_path / tag)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.log_every = 3, 6, 1
    cfg.train.learning_rate, cfg.train.progress, cfg.train.lr_scheduler = 1e-2, False, "constant"
    for key, value in train.items():
        section, _, field = key.partition("__")
        setattr(getattr(cfg, section), field, value)
    policy = model(name, len(tokenizer))
    result = runner.run(cfg, records=data(tokenizer), eval_records=[], model=policy, tokenizer=tokenizer)
    lines = (tmp_path / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines], result


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_gradient_checkpointing_gives_the_same_loss_curve(tmp_path, name, packing):
    plain, _ = curve(tmp_path, name, "plain", data__packing=packing)
    checkpointed, result = curve(
        tmp_path, name, "checkpointed", data__packing=packing, train__gradient_checkpointing=True
    )
    assert result.model.is_gradient_checkpointing
    assert checkpointed == pytest.approx(plain, abs=1e-6)
    assert plain[-1] < plain[0] - 1e-3  # it trained, so equal curves mean something


def test_gradient_checkpointing_on_a_model_without_it_is_a_config_error():
    from prefalign.core.errors import ConfigError
    from prefalign.core.train import enable_gradient_checkpointing

    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_bf16_mixed_precision_tracks_float32(tmp_path):
    """accelerate's bf16 autocast (on CPU here; the same switch on GPU): the loss curve stays within bf16
    rounding (~1e-2) of the float32 one, and the step-1 loss is ln 2 (policy = reference)."""
    from accelerate.state import AcceleratorState

    fp32, _ = curve(tmp_path, "qwen2", "fp32")
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        bf16, _ = curve(tmp_path, "qwen2", "bf16", train__mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert bf16[0] == pytest.approx(0.6931, abs=2e-3)
    assert bf16 == pytest.approx(fp32, abs=2e-2)
    assert bf16 != fp32  # autocast really ran in bf16
