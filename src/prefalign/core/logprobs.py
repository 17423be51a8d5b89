"""Per-sequence response log-probs, one forward per batch.

Collate encoded records (`core/encode.py`) into batches and compute summed response log-probs.
A record with n candidates is n sequences `prompt_ids + response_ids`.

Two batch layouts give the same log-probs (tested to 1e-5):
- padded (`collate(..., packed=False)`): C rows `prompt + response`, right-padded to the longest.
- packed (`collate(..., packed=True)`): ONE row holding, per record, the prompt once followed by each of
  its candidates; `position_ids` restart so every candidate sits right after its prompt, and attention is
  confined to the record and, inside it, to (prompt + own candidate). No padding, the shared prompt is
  computed once, and logits are computed only where a response token is predicted. It runs through
  transformers' attention-function interface (`_supports_attention_backend` models that place tokens by
  `position_ids`: GPT-2, Llama, Qwen, Mistral, ...); `check_packing` verifies a model numerically.
"""

import contextlib
import sys

import torch

from prefalign.core.console import progress
from prefalign.core.encode import (  # noqa: F401  (encode_records, is_chat: re-exported)
    EncodedRecord,
    encode_prompt,
    encode_records,
    is_chat,
    position_limit,
    special_prefix,
)
from prefalign.core.packing import PackingUnsupported, packed_token_logps, support


def _record_fields(encoded: list[EncodedRecord]) -> dict:
    """The per-record part of a batch, shared by both layouts: candidate_index, ranking, weight, annotator,
    reference_logps (when every record has them)."""
    n = max(len(r.response_ids) for r in encoded)
    candidate_index = torch.full((len(encoded), n), -1, dtype=torch.long)
    ranking = torch.full((len(encoded), n), -1, dtype=torch.long)
    c = 0
    for b, record in enumerate(encoded):
        k = len(record.response_ids)
        if len(record.ranking) > k or len(set(record.ranking)) != len(record.ranking):
            raise ValueError(f"record {b} of the batch: ranking {record.ranking} is not a set of indices")
        if any(not 0 <= r < k for r in record.ranking):
            raise ValueError(
                f"record {b} of the batch: ranking {record.ranking} indexes outside {k} responses"
            )
        ranking[b, : len(record.ranking)] = torch.tensor(record.ranking, dtype=torch.long)
        candidate_index[b, :k] = torch.arange(c, c + k)
        c += k
    fields = {
        "candidate_index": candidate_index,
        "ranking": ranking,
        "weight": torch.tensor([r.weight for r in encoded], dtype=torch.float32),
        "annotator": [r.annotator for r in encoded],
    }
    if all(r.reference_logps is not None for r in encoded):
        reference_logps = torch.zeros((len(encoded), n), dtype=torch.float32)
        for b, record in enumerate(encoded):
            reference_logps[b, : len(record.reference_logps)] = torch.tensor(record.reference_logps)
        fields["reference_logps"] = reference_logps
    return fields


def collate(encoded: list[EncodedRecord], pad_token_id: int, packed: bool = False) -> dict:
    """Right-padded batch of all C candidates of B records (see docs/architecture.md "Log-probs"),
    or with `packed=True` the padding-free layout of `collate_packed`."""
    if packed:
        return collate_packed(encoded)
    fields = _record_fields(encoded)
    sequences, response_masks = [], []
    for record in encoded:
        for response_ids in record.response_ids:
            sequences.append(record.prompt_ids + response_ids)
            response_masks.append([0] * len(record.prompt_ids) + [1] * len(response_ids))
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for c, (ids, mask) in enumerate(zip(sequences, response_masks)):
        input_ids[c, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[c, : len(ids)] = 1
        response_mask[c, : len(ids)] = torch.tensor(mask, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        **fields,
    }


def collate_packed(encoded: list[EncodedRecord], share_prompt: bool = True) -> dict:
    """One padding-free row for a batch of B records: per record, the prompt then each candidate.

    Keys besides the per-record ones of `collate`: `input_ids [1, L]`; `position_ids [1, L]` (a candidate's
    positions continue from its prompt's end); `segment [L]` (0 = prompt, j + 1 = candidate j);
    `record_offsets [B + 1]` (record b spans [offsets[b], offsets[b + 1])); and for the scored tokens
    `target_position [N]` (where the logits that predict each response token are), `target_ids [N]` and
    `target_candidate [N]` (flat candidate index). With `share_prompt=False` each candidate carries its own
    copy of the prompt (a plain packing of the C sequences of the padded layout).
    """
    fields = _record_fields(encoded)
    ids, positions, segment, offsets = [], [], [], [0]
    target_position, target_ids, target_candidate = [], [], []
    c = 0
    for record in encoded:
        prompt, n_prompt = record.prompt_ids, len(record.prompt_ids)
        if share_prompt:
            ids += prompt
            positions += range(n_prompt)
            segment += [0] * n_prompt
        for j, response in enumerate(record.response_ids):
            if not share_prompt:
                ids += prompt
                positions += range(n_prompt)
                segment += [j + 1] * n_prompt
            start = len(ids)  # the first response token; its predictor is the prompt's last token
            ids += response
            positions += range(n_prompt, n_prompt + len(response))
            segment += [j + 1] * len(response)
            prompt_end = offsets[-1] + n_prompt - 1 if share_prompt else start - 1
            target_position += [prompt_end, *range(start, start + len(response) - 1)]
            target_ids += response
            target_candidate += [c] * len(response)
            c += 1
        offsets.append(len(ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "segment": torch.tensor(segment, dtype=torch.long),
        "record_offsets": torch.tensor(offsets, dtype=torch.long),
        "target_position": torch.tensor(target_position, dtype=torch.long),
        "target_ids": torch.tensor(target_ids, dtype=torch.long),
        "target_candidate": torch.tensor(target_candidate, dtype=torch.long),
        **fields,
    }


# ------------------------------------------------------------------ packed attention


def sequence_logps(model, batch: dict, average: bool = False):
    """-> (logps [B, n], n_tokens [B, n]): summed (mean if `average`) log p(response | prompt) per candidate.

    One forward over all C candidates, padded or packed (a batch with `position_ids` from `collate_packed`).
    Position t's logits predict token t+1, so logits and labels are shifted by one and only response tokens
    (incl. EOS) count. Entries without a candidate are 0.
    """
    if "target_position" in batch:
        token_logps, candidate = packed_token_logps(model, batch)
        n_flat = int(batch["candidate_index"].max()) + 1
        flat_logps = token_logps.new_zeros(n_flat).index_add(0, candidate, token_logps)
        flat_counts = torch.bincount(candidate, minlength=n_flat)
        return _per_record(batch, flat_logps, flat_counts, average)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logits = logits[:, :-1].float()  # no copy when the model already returns float32
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    mask = batch["response_mask"][:, 1:].bool()
    # log_softmax at the label only: gather - logsumexp, never a second [C, T, V] tensor
    token_logps = logits.gather(-1, labels).squeeze(-1) - logits.logsumexp(-1)
    token_logps = torch.where(mask, token_logps, 0.0)
    return _per_record(batch, token_logps.sum(-1), mask.sum(-1), average)


# per-token tolerance of check_packing by the model's precision: float32 sums differ by reduction order only
# (~1e-6 per token); bfloat16 rounds to 3 significant digits, so two equally valid layouts of the same
# records differ by up to ~1e-3 per token on the compat matrix's models (a fault such as a dropped sliding
# window moves the mean by 0.1-0.5)
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CHECK_RECORDS = 4


def packing_tolerance(model) -> float:
    """check_packing's per-token tolerance for the least precise floating dtype among `model`'s weights."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max((TOLERANCE.get(d, 2e-2) for d in dtypes), default=1e-4)


def longest_records(encoded: list[EncodedRecord], n: int = CHECK_RECORDS) -> list[EncodedRecord]:
    """The `n` records with the longest prompt + candidate (then the most candidates): where a mask fault
    such as a dropped sliding window shows, unlike in short records."""
    if hasattr(encoded, "longest"):  # records on disk: from the Arrow columns (core.encode_arrow.EncodedSet)
        return encoded.longest(n)
    key = [(len(r.prompt_ids) + max(map(len, r.response_ids)), len(r.response_ids)) for r in encoded]
    order = sorted(range(len(encoded)), key=lambda i: key[i], reverse=True)
    return [encoded[i] for i in sorted(order[:n])]


@torch.no_grad()
def check_packing(
    model, encoded: list[EncodedRecord], pad_token_id: int, tolerance: float | None = None
) -> None:
    """Raise `PackingUnsupported` (a ValueError) unless packed and padded log-probs agree on the longest
    `CHECK_RECORDS` of `encoded` (mean per token, to `tolerance`, by default `packing_tolerance(model)`).

    A model without the attention-function interface, one whose packed forward raises, and one whose numbers
    differ (a mask rule the packed layout does not reproduce) all fail here."""
    reason = support(model)
    if reason is not None:
        raise PackingUnsupported(f"{reason}; set data.packing: false")
    records = longest_records(encoded)
    if not records:
        return
    tolerance = packing_tolerance(model) if tolerance is None else tolerance
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        padded, n_tokens = sequence_logps(model, _to(collate(records, pad_token_id), device))
        try:
            packed, _ = sequence_logps(model, _to(collate_packed(records), device))
        except (ValueError, TypeError, NotImplementedError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PackingUnsupported(
                f"{type(model).__name__} fails on the packed layout ({first}); set data.packing: false"
            ) from e
    finally:
        model.train(was_training)
    gap = float(((packed - padded) / n_tokens.clamp(min=1)).abs().max())
    if not gap <= tolerance:
        raise PackingUnsupported(
            f"packed and padded log-probs of {type(model).__name__} differ by {gap:.2e} per token "
            f"(tolerance {tolerance:.0e} for its dtype): this model does not support padding-free packing; "
            "set data.packing: false"
        )


def choose_layout(model, encoded: list[EncodedRecord], pad_token_id: int, packing: bool = True) -> bool:
    """Packed batches when `packing` is asked for and `check_packing` passes on this model and these records;
    otherwise padded batches, with one line saying why. Call it before any heavy work."""
    if not packing:
        return False
    try:
        check_packing(model, encoded, pad_token_id)
    except PackingUnsupported as e:
        reason = str(e).removesuffix("; set data.packing: false")
        print(f"data.packing: {reason}; using padded batches instead", file=sys.stderr, flush=True)
        return False
    return True


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _per_record(batch, flat_logps, flat_counts, average):
    """Flat [C] sums -> [B, n] by `candidate_index` (0 where a record has no candidate j)."""
    index = batch["candidate_index"]
    present = index >= 0
    logps = torch.where(present, flat_logps[index.clamp(min=0)], 0.0)
    n_tokens = torch.where(present, flat_counts[index.clamp(min=0)], 0)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def _room(model, prompt_width: int, max_new_tokens: int) -> int:
    """New tokens that still fit the model's learned positions (GPT-2 has none past n_positions), leaving one
    for the EOS that scoring appends to a response (`encode_records`)."""
    limit = position_limit(model)
    return max_new_tokens if not limit else max(1, min(max_new_tokens, limit - prompt_width - 1))


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts,
    n_per_prompt=1,
    max_new_tokens=64,
    temperature=1.0,
    top_p=1.0,
    batch_size=64,
    seed=None,
    max_prompt_length=256,
) -> list[list[str]]:
    """Sample `n_per_prompt` responses per prompt (text or chat messages) -> one list of strings per prompt.

    Prompts are encoded like `encode_records` does and left-padded; only the new tokens are decoded, cut at
    the first EOS. `temperature=0` is greedy. `seed` makes sampling reproducible without touching the
    global RNG state.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    device = next(model.parameters()).device
    prefix = special_prefix(tokenizer)
    prompt_ids = [
        encode_prompt(tokenizer, p, max_prompt_length, f"prompt {i}", prefix) for i, p in enumerate(prompts)
    ]
    jobs = [ids for ids in prompt_ids for _ in range(n_per_prompt)]
    texts = []
    was_training = model.training
    model.eval()
    rng = contextlib.nullcontext()
    if seed is not None:
        accelerators = [] if device.type == "cpu" else [device.index or 0]
        rng = torch.random.fork_rng(devices=accelerators, device_type=device.type)
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        starts = range(0, len(jobs), batch_size)
        for start in progress(starts, desc="generate", disable=len(starts) < 2):
            chunk = jobs[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device
            )
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=_room(model, width, max_new_tokens),
                pad_token_id=pad,
                eos_token_id=eos,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            for row in out[:, width:].tolist():
                row = row[: row.index(eos)] if eos in row else row
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return [texts[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]
