"""Padding-free packed attention: one row holds, per record, the prompt once and then each candidate.

Token q of a record may attend to token k iff both are in the same record, k is in the prompt or in q's
own candidate, and the MODEL's own mask rule allows it at their positions: causal, plus a sliding window
(Mistral, Qwen2 `use_sliding_window`, Gemma2/3 on their sliding layers), chunked attention, ... .

How: the model runs with attention implementation `prefalign_packed`, registered with transformers twice:
- as a mask function (`AttentionMaskInterface`): the model calls it once per mask type it uses (full,
  sliding), handing over its own rule `mask_function(b, h, q_idx, kv_idx)`; we evaluate that rule at the
  tokens' POSITIONS (inside a record, prompt + own candidate are one contiguous sequence whose positions are
  the indices of the unpacked sequence) and intersect it with the record/candidate structure. Per-layer
  window patterns come for free: every layer gets the mask of its own type.
- as an attention function (`AttentionInterface`): it receives that mask and computes attention through
  one of three paths, equal to 1e-5 in float32 (tests/test_packing.py):
  * `flex`   - torch's flex_attention with a BlockMask (CUDA; one fused kernel, no loop over records);
  * `blocks` - the records gathered into one [records, heads, longest, dim] batch, one attention call
               (vectorized; any device);
  * `loop`   - one attention call per record (the fallback: used when the blocks would waste > 4x the
               packed area on padding, with attention dropout in training, or when asked for).
  Logit softcapping (Gemma2) is applied in every path. The path can be forced with the environment
  variable PREFALIGN_PACKED_ATTENTION=flex|blocks|loop; the first use of each path prints one line.

A model that builds no mask through transformers' mask interface, or passes attention arguments this file
does not implement (`position_bias`, attention sinks), raises `PackingUnsupported` on its first packed
forward; `core.logprobs.choose_layout` turns that into one line and the padded layout, before any work.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from prefalign.core import vocab

PACKED_ATTENTION = "prefalign_packed"
PATHS = ("flex", "blocks", "loop")
UNSUPPORTED_ARGUMENTS = ("position_bias", "s_aux", "sinks")
_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("prefalign_packed_layout", default=None)
_ANNOUNCED: set[str] = set()


class PackingUnsupported(ValueError):
    """This model cannot run the packed layout (the message says why and names data.packing)."""


@dataclass
class PackedLayout:
    """Where each token of a packed row sits: its record, segment (0 = prompt, j + 1 = candidate j) and
    position; `index [B, l]` gathers record b's tokens into a block (padding slots point at token 0 and are
    marked False in `valid`), `inverse [L]` puts them back."""

    record: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    lengths: list[int]
    index: torch.Tensor
    valid: torch.Tensor
    inverse: torch.Tensor
    path: str
    config: object = None  # the model config whose attention implementation the forward switched


@dataclass
class PackedMask:
    """What the attention function receives instead of a dense mask: the layout and, per path, either the
    block masks [B, 1, l, l] (blocks, loop) or a flex BlockMask."""

    layout: PackedLayout
    blocks: torch.Tensor | None = None
    block_mask: object = None

    @property
    def shape(self):  # some models read the mask's shape; this is the dense mask it stands for
        n = self.layout.record.numel()
        return (1, 1, n, n)


def make_layout(batch: dict, path: str) -> PackedLayout:
    """The layout of a packed batch (`core.logprobs.collate_packed`) on the batch's device."""
    segment = batch["segment"]
    device = segment.device
    offsets = batch["record_offsets"].tolist()
    lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    n_records, longest = len(lengths), max(lengths)
    starts = torch.tensor(offsets[:-1], device=device)
    length = torch.tensor(lengths, device=device)
    slot = torch.arange(longest, device=device)
    valid = slot[None, :] < length[:, None]
    index = torch.where(valid, starts[:, None] + slot[None, :], 0)
    record = torch.repeat_interleave(torch.arange(n_records, device=device), length)
    inverse = record * longest + (torch.arange(segment.numel(), device=device) - starts[record])
    return PackedLayout(record, segment, batch["position_ids"][0], lengths, index, valid, inverse, path)


def choose_path(model, batch: dict) -> str:
    """flex on CUDA when torch has it, blocks elsewhere; the loop when the blocks would be mostly padding
    (records of very different lengths) or when attention dropout is active in training (flex has none, and
    the loop draws the same dropout masks as one SDPA call per record always did, so runs with dropout
    reproduce earlier ones)."""
    forced = os.environ.get("PREFALIGN_PACKED_ATTENTION", "auto")
    if forced in PATHS:
        return forced
    if forced != "auto":
        raise PackingUnsupported(
            f"PREFALIGN_PACKED_ATTENTION={forced!r}: use one of auto, {', '.join(PATHS)}"
        )
    config = getattr(model, "config", None)
    dropout = _attention_dropout(config) if model.training else 0.0
    if dropout > 0:
        return "loop"
    if batch["input_ids"].is_cuda and _flex() is not None:
        return "flex"
    offsets = batch["record_offsets"]
    lengths = (offsets[1:] - offsets[:-1]).double()
    return "blocks" if len(lengths) * lengths.max() ** 2 <= 4 * (lengths**2).sum() else "loop"


def _attention_dropout(config) -> float:
    """The attention dropout a config sets, under any of transformers' names for it."""
    names = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
    return max((float(getattr(config, n, 0.0) or 0.0) for n in names), default=0.0)


def _flex():
    """(flex_attention, create_block_mask), or None where this torch has no flex attention. Compiled (one
    fused kernel) for CUDA tensors; torch's unfused reference version elsewhere, which has no backward on
    CPU and serves to test the mask and score functions (PREFALIGN_PACKED_ATTENTION=flex, no grad)."""
    global _FLEX
    if _FLEX is None:
        try:  # optional: torch >= 2.5
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            compiled = torch.compile(flex_attention, dynamic=True)

            def attend(query, *args, **kwargs):
                fn = compiled if query.is_cuda else flex_attention
                return fn(query, *args, **kwargs)

            _FLEX = (attend, create_block_mask)
        except Exception:  # noqa: BLE001 - any failure means: no flex path
            _FLEX = False
    return _FLEX or None


_FLEX = None


_PATH_TEXT = {
    "flex": "flex_attention, one kernel",
    "blocks": "records batched",
    "loop": "one call per record",
}
_DEFER = contextvars.ContextVar("prefalign_defer_path_lines", default=False)


def _announce(path: str) -> None:
    """Name each attention path once per process: on stderr, or (inside `announce_later`) in the run's start
    block, which reads `paths_used`."""
    if path not in _ANNOUNCED:
        _ANNOUNCED.add(path)
        if not _DEFER.get():
            print(
                f"packing: packed attention path '{path}' ({_PATH_TEXT[path]})", file=sys.stderr, flush=True
            )


@contextlib.contextmanager
def announce_later():
    """Paths first used inside this block (a run's set-up: `check_packing`) are not printed; the runner's
    start block names them (`paths_used`), so nothing is printed above the run's header."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def paths_used() -> str:
    """The packed attention paths this process has used, as the console names them ('' if none)."""
    return ", ".join(f"'{p}' ({_PATH_TEXT[p]})" for p in PATHS if p in _ANNOUNCED)


# ------------------------------------------------------------------ the mask function


def _apply(mask_function, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """The model's mask rule at positions (broadcast like transformers' non-vmap path)."""
    zero = torch.zeros((), dtype=torch.long, device=q_pos.device)
    return mask_function(zero, zero, q_pos, kv_pos)


def packed_mask(batch_size, q_length, kv_length, mask_function=None, **kwargs) -> PackedMask:
    """Mask interface for `prefalign_packed`: the model's rule at positions, inside record and candidate."""
    layout = _LAYOUT.get()
    if layout is None:
        raise PackingUnsupported("the packed attention was used outside a packed batch")
    n = layout.record.numel()
    if batch_size != 1 or q_length != n or kv_length != n:
        raise PackingUnsupported(f"packed mask for a batch of shape {batch_size}x{q_length}, expected 1x{n}")
    if layout.path == "flex":
        record, segment, position = layout.record, layout.segment, layout.position

        def mask_mod(b, h, q, kv):
            same = (record[q] == record[kv]) & ((segment[kv] == 0) | (segment[kv] == segment[q]))
            return same & mask_function(b, h, position[q], position[kv])

        create_block_mask = _flex()[1]
        device = layout.record.device
        block_mask = create_block_mask(mask_mod, 1, None, n, n, device=device, _compile=device.type == "cuda")
        return PackedMask(layout, block_mask=block_mask)
    seg = layout.segment[layout.index]  # [B, l]
    pos = layout.position[layout.index]
    valid = layout.valid
    same = (
        valid[:, :, None]
        & valid[:, None, :]
        & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    )
    allowed = same & _apply(mask_function, pos[:, :, None], pos[:, None, :]).expand_as(same)
    # a padding slot attends to itself only, so no row of the softmax is empty (its output is dropped)
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    allowed = allowed | (eye[None] & ~valid[:, :, None])
    return PackedMask(layout, blocks=allowed[:, None])


# ------------------------------------------------------------------ the attention function


def _attend(module, query, key, value, mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Attention of [b, heads, l, dim] blocks under a boolean mask -> [b, l, heads, dim]: transformers' SDPA
    function, or (with logit softcapping, which SDPA lacks) the same computation written out."""
    if softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False
        )[0]
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over a packed row [1, heads, L, dim] -> ([1, L, heads, dim], None) by the mask's path."""
    if not isinstance(attention_mask, PackedMask):
        raise PackingUnsupported(
            f"{type(module).__name__} builds no attention mask through transformers' mask interface"
        )
    used = [name for name in UNSUPPORTED_ARGUMENTS if kwargs.get(name) is not None]
    if used:
        raise PackingUnsupported(f"{type(module).__name__} passes {', '.join(used)}, not implemented here")
    options = {k: kwargs.get(k) for k in ("dropout", "scaling", "softcap")}
    options["dropout"] = options["dropout"] or 0.0
    layout = attention_mask.layout
    if layout.path == "flex":
        flex_attention = _flex()[0]
        softcap = options["softcap"]
        score_mod = None
        if softcap is not None:

            def score_mod(score, b, h, q, kv):
                return torch.tanh(score / softcap) * softcap

        out = flex_attention(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=attention_mask.block_mask,
            scale=options["scaling"],
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    blocks = attention_mask.blocks
    if layout.path == "loop":
        outputs, start = [], 0
        for b, length in enumerate(layout.lengths):
            s = slice(start, start + length)
            mask = blocks[b : b + 1, :, :length, :length]
            outputs.append(_attend(module, query[:, :, s], key[:, :, s], value[:, :, s], mask, **options))
            start += length
        return torch.cat(outputs, dim=1), None
    n_blocks, longest = layout.index.shape

    def gather(x):  # [1, h, L, d] -> [B, h, l, d]
        return x[0][:, layout.index.reshape(-1)].unflatten(1, (n_blocks, longest)).transpose(0, 1)

    out = _attend(module, gather(query), gather(key), gather(value), blocks, **options)  # [B, l, h, d]
    return out.flatten(0, 1)[layout.inverse][None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)


# ------------------------------------------------------------------ running a model on a packed row


def support(model) -> str | None:
    """Why `model` cannot run the packed layout, or None. Static: the attention-function interface."""
    bare = extract_model_from_parallel(model)
    if getattr(bare, "config", None) is None or not getattr(bare, "_supports_attention_backend", False):
        return f"{type(bare).__name__} has no attention-function interface (`_supports_attention_backend`)"
    return None


def checkpoint_contexts():
    """`context_fn` for torch's non-reentrant activation checkpointing: a layer recomputed in the backward
    pass of a packed forward runs with the packed attention again (the config is restored after the forward,
    long before the backward)."""
    layout = _LAYOUT.get()
    if layout is None or layout.config is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), _implementation(layout.config, PACKED_ATTENTION)


@contextlib.contextmanager
def _implementation(config, name: str):
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run `model` with attention implementation `name` (its config is shared by all its layers)."""
    reason = support(model)
    if reason is not None:
        raise PackingUnsupported(
            f"packed log-probs need a transformers model like GPT-2 or Llama: {reason}; "
            "set data.packing: false"
        )
    with _implementation(extract_model_from_parallel(model).config, name):
        yield


def packed_hidden_forward(model, batch: dict, **kwargs):
    """The model's output on a packed row (`kwargs` go to the model's forward)."""
    path = choose_path(extract_model_from_parallel(model), batch)
    if path == "flex" and _flex() is None:
        raise PackingUnsupported("PREFALIGN_PACKED_ATTENTION=flex, but this torch has no flex_attention")
    layout = make_layout(batch, path)
    layout.config = extract_model_from_parallel(model).config
    token = _LAYOUT.set(layout)
    try:
        with attention_implementation(model, PACKED_ATTENTION):
            out = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                # an all-ones 2D mask: transformers then hands us its mask rule on plain indices, instead
                # of splitting the row into sequences where positions restart (its own packing format)
                attention_mask=torch.ones_like(batch["input_ids"]),
                use_cache=False,
                **kwargs,
            )
    finally:
        _LAYOUT.reset(token)
    _announce(path)
    return out


def packed_token_logps(model, batch: dict):
    """(log-prob of every response token [N], its flat candidate index [N]) from one packed forward.

    The model runs only up to its final hidden states at the N positions that predict a response token
    (`logits_to_keep`); its LM head is fed zero tokens and `core.vocab.token_logps` applies it in chunks.
    Under FSDP (sharded weights, only valid inside the forward) or without an output embedding, the model's
    own logits at those positions are used."""
    bare = extract_model_from_parallel(model)
    head = bare.get_output_embeddings() if hasattr(bare, "get_output_embeddings") else None
    keep = batch["target_position"]
    if head is None or _sharded(model, head):
        logits = packed_hidden_forward(model, batch, logits_to_keep=keep).logits[0].float()
        token_logps = logits.gather(-1, batch["target_ids"][:, None]).squeeze(-1) - logits.logsumexp(-1)
        return token_logps, batch["target_candidate"]
    captured = []

    def take_hidden(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],)  # the model's own LM head computes nothing

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        packed_hidden_forward(model, batch, logits_to_keep=keep)
    finally:
        handle.remove()
    hidden = captured[0][0]  # [N, hidden]: the positions of `keep`, in order
    return vocab.token_logps(hidden, head, batch["target_ids"], bare.config), batch["target_candidate"]


def _sharded(model, head) -> bool:
    weight = getattr(head, "weight", None)
    return (
        "FullyShardedDataParallel" in type(model).__name__
        or type(weight).__name__ == "DTensor"
        or (weight is not None and weight.numel() == 0)
    )
