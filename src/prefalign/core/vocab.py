"""Response-token log-probs over a long vocabulary without a [tokens, vocab] float32 tensor.

`token_logps(hidden [N, H], head, targets [N], config)` = log softmax(f(head(hidden)))[target] per token,
computed `chunk_tokens(V)` tokens at a time; with gradients and more than one chunk, each chunk is
recomputed in the backward pass (`torch.utils.checkpoint`), so forward and backward hold one chunk's logits
(<= CHUNK_ELEMENTS floats) instead of N x V. f is the model's final-logit map after its LM head, read from
its config: Gemma2/3 `final_logit_softcapping` (c * tanh(z / c)), Granite `logits_scaling` (z / s), Cohere
`logit_scale` (z * s); a model with another map fails `core.logprobs.check_packing` (which compares against
the model's own logits) and trains on padded batches.

A fused GPU kernel (Liger's fused linear cross-entropy) is not wired in: it returns a reduced loss, and no
GPU was at hand to verify a per-token variant (benchmarks/README.md).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24  # 16M logits per chunk: 64 MiB in float32


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def final_logit_map(config):
    """The model's map from LM-head outputs to logits (identity for most models)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scaling = getattr(config, "logits_scaling", None)
    scale = (
        getattr(config, "logit_scale", None)
        if str(getattr(config, "model_type", "")).startswith("cohere")
        else None
    )
    if softcap:
        return lambda z: torch.tanh(z / softcap) * softcap
    if scaling:
        return lambda z: z / scaling
    if scale is not None:
        return lambda z: z * scale
    return lambda z: z


def _chunk_logps(hidden, targets, head, logit_map):
    logits = logit_map(head(hidden)).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logps(hidden: torch.Tensor, head, targets: torch.Tensor, config) -> torch.Tensor:
    """[N] log-probs of `targets` from the final hidden states at the positions that predict them."""
    logit_map = final_logit_map(config)
    step = chunk_tokens(getattr(head, "out_features", None) or head.weight.shape[0])
    n = hidden.shape[0]
    if n <= step:
        return _chunk_logps(hidden, targets, head, logit_map)
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    out = []
    for start in range(0, n, step):
        h, t = hidden[start : start + step], targets[start : start + step]
        if grad:
            out.append(checkpoint(_chunk_logps, h, t, head, logit_map, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, t, head, logit_map))
    return torch.cat(out)
