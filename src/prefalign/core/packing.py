"""Padding-free packed attention: one row holds, per record, the prompt once and then each candidate.

Token q of a record attends to token k of the same record iff k <= q and k is in the prompt or in q's own
candidate. It runs through transformers' attention-function interface (`AttentionInterface`), so models
that place tokens by `position_ids` (GPT-2, Llama, Qwen, Mistral, ...) run the packed layout unchanged.
"""

import contextlib

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_ATTENTION = "prefalign_packed"


def record_masks(batch: dict) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, mask [1, 1, l, l]) per record of a packed batch: token q sees token k of its record iff
    k <= q and k is in the prompt or in q's own candidate."""
    blocks = []
    offsets = batch["record_offsets"].tolist()
    for start, end in zip(offsets[:-1], offsets[1:]):
        seg = batch["segment"][start:end]
        idx = torch.arange(end - start, device=seg.device)
        mask = (idx[None, :] <= idx[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
        blocks.append((start, end, mask[None, None]))
    return blocks


def packed_attention(module, query, key, value, attention_mask, packed_blocks=None, **kwargs):
    """Attention over a packed row, one record at a time (so the cost is sum of l_b^2, not L^2), each
    through transformers' own SDPA function (GQA, scaling and dropout as the model sets them)."""
    if packed_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask, is_causal=False, **kwargs
        )[0]
        for s, e, mask in packed_blocks
    ]
    return torch.cat(outputs, dim=1), None  # [1, L, heads, head_dim]


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run `model` with attention implementation `name` (its config is shared by all its layers)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"packed log-probs need a transformers model with `_supports_attention_backend` "
            f"(GPT-2, Llama, ...); {type(model).__name__} has none: set data.packing: false"
        )
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_token_logps(model, batch: dict):
    """(log-prob of every response token [N], its flat candidate index [N]) from one packed forward."""
    with attention_implementation(extract_model_from_parallel(model), PACKED_ATTENTION):
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            packed_blocks=record_masks(batch),
            logits_to_keep=batch[
                "target_position"
            ],  # the LM head runs only where a response token is predicted
            use_cache=False,
        ).logits[0]
    logits = logits.float()
    token_logps = logits.gather(-1, batch["target_ids"][:, None]).squeeze(-1) - logits.logsumexp(-1)
    return token_logps, batch["target_candidate"]
