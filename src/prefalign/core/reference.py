"""Reference log-probs log π_ref(y|x), three ways behind one interface (a function batch -> [B, n] logps):

- "precompute": one pass of the reference over the data before training, stored in each
  `EncodedRecord.reference_logps` (collated as `batch["reference_logps"]`) and cached on disk. Cheapest:
  no reference model in memory during training. The default ("auto").
- "frozen": a frozen copy of the reference model, run on every batch (eval mode, no grad).
- "adapter": the policy is a `peft.PeftModel`; the reference is its base model with the adapters disabled,
  so no second copy of the weights is needed.
"""

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from safetensors.torch import load_file, save_file

from prefalign.core.console import progress
from prefalign.core.errors import ConfigError
from prefalign.core.logprobs import collate, sequence_logps

STRATEGIES = ("precompute", "frozen", "adapter")


def resolve_strategy(requested: str, is_peft: bool) -> str:
    """ "auto" -> "precompute"; "adapter" needs a PEFT policy."""
    if requested == "auto":
        return "precompute"
    if requested not in STRATEGIES:
        raise ConfigError(
            f"config key 'model.reference.strategy': expected 'auto' or one of {STRATEGIES}, got {requested!r}"
        )
    if requested == "adapter" and not is_peft:
        raise ConfigError(
            "config key 'model.reference.strategy': 'adapter' needs a LoRA policy (model.lora.enabled: true); "
            "use 'frozen' or 'precompute'"
        )
    return requested


def weights_hash(model) -> str:
    """Hash of the state dict: names, dtypes, shapes and the bytes of every tensor."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def data_hash(encoded) -> str:
    """Hash of every record's token ids (the ranking does not change log-probs, so it is left out)."""
    digest = hashlib.blake2b(digest_size=16)
    for record in encoded:
        digest.update(json.dumps([record.prompt_ids, record.response_ids]).encode())
    return digest.hexdigest()


def process_state() -> PartialState:
    """accelerate's process state; created here first, it must still honour ACCELERATE_USE_CPU (set by
    `accelerate launch --cpu`, or by hand with torchrun), as `Accelerator()` would, or CPU ranks never join."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


@torch.no_grad()
def _compute(reference_model, encoded, batch_size, pad_token_id, average, desc):
    device = next(reference_model.parameters()).device
    was_training = reference_model.training
    reference_model.eval()
    # batches of similar lengths waste less compute on padding
    order = sorted(
        range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids) + max(map(len, encoded[i].response_ids))
    )
    # under `accelerate launch` each process computes every P-th batch; the results are gathered to all
    state = process_state()
    starts = list(range(0, len(order), batch_size))[state.process_index :: state.num_processes]
    mine = []
    for start in progress(starts, desc=desc, disable=len(starts) <= 1 or not state.is_main_process):
        rows = order[start : start + batch_size]
        batch = collate([encoded[i] for i in rows], pad_token_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        values, _ = sequence_logps(reference_model, batch, average=average)
        for i, row in zip(rows, values.float().cpu().tolist()):
            mine.append((i, row[: len(encoded[i].response_ids)]))
    reference_model.train(was_training)
    logps = [None] * len(encoded)
    for i, row in gather_object(mine) if state.num_processes > 1 else mine:
        logps[i] = row
    return logps


def precompute_reference_logps(
    reference_model,
    encoded,
    *,
    batch_size=16,
    pad_token_id,
    cache_dir=None,
    average=False,
    desc="reference log-probs",
):
    """Fill `encoded[i].reference_logps` (one float per candidate) and return them.

    With `cache_dir`, results are stored as safetensors under a key made of the data's token ids, the
    reference weights and `average`; changing any of them computes afresh, an identical call reads the file.
    """
    path = None
    if cache_dir is not None:
        key = hashlib.blake2b(
            f"{data_hash(encoded)}|{weights_hash(reference_model)}|average={average}".encode(), digest_size=16
        ).hexdigest()
        path = Path(cache_dir) / f"reference_logps-{key}.safetensors"
    if path is not None and path.exists():
        stored = load_file(path)
        flat, counts = stored["logps"].tolist(), stored["counts"].tolist()
        logps, start = [], 0
        for count in counts:
            logps.append(flat[start : start + count])
            start += count
    else:
        logps = _compute(reference_model, encoded, batch_size, pad_token_id, average, desc)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {
                "logps": torch.tensor([v for row in logps for v in row], dtype=torch.float32),
                "counts": torch.tensor([len(row) for row in logps], dtype=torch.long),
            }
            if process_state().is_main_process:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, tmp)
                os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    for record, row in zip(encoded, logps):
        record.reference_logps = row
    return logps


def live_reference(strategy, policy, reference_model=None, average=False):
    """-> reference_fn(batch) -> [B, n] reference log-probs (no grad).

    "frozen": `reference_model` (default: a deep copy of `policy` taken now), frozen, eval mode, moved to
    the batch's device on first use. "adapter": `policy` is a PeftModel run with its adapters disabled (in
    eval mode, so no dropout). "precompute": reads `batch["reference_logps"]`.
    """
    if strategy == "precompute":

        def precomputed(batch):
            if "reference_logps" not in batch:
                raise KeyError(
                    "batch has no 'reference_logps': call precompute_reference_logps on the records first"
                )
            return batch["reference_logps"]

        return precomputed
    if strategy == "frozen":
        frozen = copy.deepcopy(policy) if reference_model is None else reference_model
        frozen.requires_grad_(False).eval()

        @torch.no_grad()
        def frozen_reference(batch):
            device = batch["input_ids"].device
            if next(frozen.parameters()).device != device:
                frozen.to(device)
            return sequence_logps(frozen, batch, average=average)[0]

        return frozen_reference
    if strategy == "adapter":
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("reference strategy 'adapter' needs a peft.PeftModel policy")

        @torch.no_grad()
        def adapter_reference(batch):
            was_training = policy.training
            policy.eval()
            with policy.disable_adapter():
                logps = sequence_logps(policy, batch, average=average)[0]
            policy.train(was_training)
            return logps

        return adapter_reference
    raise ValueError(f"unknown reference strategy {strategy!r}; expected one of {STRATEGIES}")


def prepare_reference(policy, settings, encoded_sets, *, pad_token_id, batch_size, average, cache_dir):
    """The reference for a run whose policy starts as the reference (`settings`: `model.reference`).

    "precompute" (and "auto") fills `reference_logps` into every record of `encoded_sets` (cached on disk
    under `settings.cache_dir` or `cache_dir`) and returns None: batches then carry `reference_logps`.
    "frozen" / "adapter" return a live `reference_fn(batch)`. A LoRA policy's reference is its base model:
    the adapters are disabled while precomputing."""
    is_peft = hasattr(policy, "disable_adapter")
    strategy = resolve_strategy(settings.strategy, is_peft)
    if strategy != "precompute":
        return live_reference(
            strategy, policy, None if strategy == "adapter" else copy.deepcopy(policy), average
        )
    with policy.disable_adapter() if is_peft else contextlib.nullcontext():
        for encoded in encoded_sets:
            if encoded:
                precompute_reference_logps(
                    policy,
                    encoded,
                    batch_size=batch_size,
                    pad_token_id=pad_token_id,
                    cache_dir=settings.cache_dir or cache_dir,
                    average=average,
                )
    return None
