"""Tiny models whose attention mask is more than causal, records longer than their window, and the naive
computation the packed layout is checked against (tests/test_packing_models.py, benchmarks/gpu_check.py)."""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prefalign.core.logprobs import EncodedRecord

V = 61
WINDOW = 4
BASE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)


def build(name, **extra):
    """Tiny random models; weights widened (x3) so log-probs vary and mask faults show."""
    torch.manual_seed(0)
    extra = {**BASE, **({"sliding_window": WINDOW} if name != "llama" else {}), **extra}
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**extra))
    elif name == "mistral":  # every layer slides
        model = MistralForCausalLM(MistralConfig(**extra))
    elif name == "qwen2":  # layer 0 full, layer 1 sliding (use_sliding_window from max_window_layers on)
        config = Qwen2Config(use_sliding_window=True, max_window_layers=1, **extra)
        assert config.layer_types == ["full_attention", "sliding_attention"]
        model = Qwen2ForCausalLM(config)
    elif name == "gemma2":  # attention-logit softcapping 50 (its default) + alternating sliding layers
        config = Gemma2Config(head_dim=8, **extra)
        assert config.attn_logit_softcapping and "sliding_attention" in config.layer_types
        model = Gemma2ForCausalLM(config)
    elif name == "gemma3":
        layer_types = ["sliding_attention", "full_attention"]
        config = Gemma3TextConfig(head_dim=8, layer_types=layer_types, **extra)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.float().eval()


def records(seed=0, lengths=((6, 10, 3), (3, 12, 9, 2), (9, 2, 5))):
    """(prompt length, candidate lengths...) per record; most sequences are longer than the window."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(2, V, (n,), generator=g).tolist()

    return [EncodedRecord(ids(p), [ids(n) for n in cands], list(range(len(cands)))) for p, *cands in lengths]


def naive_logp(model, prompt, response):
    """sum_t log p(y_t | x, y_<t): one sequence, batch 1, no mask argument, eager attention, log_softmax."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    finally:
        model.config._attn_implementation = previous
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(prompt) + t - 1, token] for t, token in enumerate(response))


def naive_matrix(model, data):
    return [[naive_logp(model, r.prompt_ids, y) for y in r.response_ids] for r in data]
