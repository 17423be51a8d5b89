"""Reference log-probs log π_ref(y|x), three ways behind one interface (a function batch -> [B, n] logps):

- "precompute": one pass of the reference over the data before training, stored in each
  `EncodedRecord.reference_logps` (collated as `batch["reference_logps"]`) and cached on disk. Cheapest:
  no reference model in memory during training. The default ("auto").
- "frozen": a frozen copy of the reference model, run on every batch (eval mode, no grad).
- "adapter": the policy is a `peft.PeftModel`; the reference is its base model with the adapters disabled,
  so no second copy of the weights is needed. When the policy starts from a trained adapter (its LoRA B
  weights are not 0, e.g. `model.name_or_path` is an SFT adapter folder), disabling it would give the base,
  not the starting model: `prepare_reference` then adds a frozen copy of the starting adapter
  (`models.REFERENCE_ADAPTER`) and the reference runs through it (`frozen_adapter_reference`).

In every strategy the reference is the policy as it is when training starts (adapters included).
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
from prefalign.core.models import REFERENCE_ADAPTER

CACHE_VERSION = 2  # bump when what the cache holds is computed differently

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


def forward_settings(model, average: bool) -> dict:
    """Everything besides weights and token ids that changes the reference's log-probs: the model class and
    config (rotary scaling, sliding window, softcapping, logit scales, dtype, ...), the attention
    implementation, which adapters are active, disabled or merged, the summed/averaged log-probs and the
    batch layout of the precompute (always padded)."""
    config = getattr(model, "config", None)
    settings = {
        "version": CACHE_VERSION,
        "class": type(model).__name__,
        "average": bool(average),
        "layout": "padded",
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype),
    }
    if config is not None and hasattr(config, "to_dict"):
        # not inputs of the forward: where it was loaded from, what wrote it, the dtype it was saved in (the
        # weights' own dtype is above); `architectures` appears once a model is saved
        drop = {
            "_name_or_path",
            "name_or_path",
            "transformers_version",
            "architectures",
            "dtype",
            "torch_dtype",
        }
        settings["config"] = {k: v for k, v in config.to_dict().items() if k not in drop}
    adapters = []
    for name, module in model.named_modules():
        if (
            hasattr(module, "active_adapters")
            and hasattr(module, "disable_adapters")
            and hasattr(module, "merged")
        ):
            adapters.append(
                [name, list(module.active_adapters), bool(module.disable_adapters), bool(module.merged)]
            )
    if adapters:
        settings["adapters"] = adapters
    return settings


def cache_key(model, encoded, average: bool) -> str:
    """The reference cache key: token ids, weights and `forward_settings`."""
    settings = json.dumps(forward_settings(model, average), sort_keys=True, default=str)
    blob = f"{data_hash(encoded)}|{weights_hash(model)}|{settings}"
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def data_hash(encoded) -> str:
    """Hash of every record's token ids (the ranking does not change log-probs, so it is left out). Records
    read from disk carry their tokenization cache key, which covers every token id (`EncodedSet.key`)."""
    if getattr(encoded, "key", None) is not None:
        return f"encoded-{encoded.key}"
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
    reference weights and everything else that changes its log-probs (`forward_settings`: config, attention
    implementation, adapter state, `average`, ...); changing any of them computes afresh, an identical call
    reads the file.
    """
    path = None
    if cache_dir is not None:
        key = cache_key(reference_model, encoded, average)
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
    if hasattr(encoded, "set_reference_logps"):  # records read from disk (core.encode_arrow.EncodedSet)
        encoded.set_reference_logps(logps)
    else:
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


def adapter_changes_model(policy) -> bool:
    """Does the active LoRA adapter change the model (some B weight non-zero)? Fresh adapters (B = 0) don't."""
    active = set(getattr(policy, "active_adapters", None) or [getattr(policy, "active_adapter", "default")])
    for name, param in policy.named_parameters():
        if ("lora_B" in name or "lora_embedding_B" in name) and any(f".{a}." in f"{name}." for a in active):
            if bool(param.detach().ne(0).any()):
                return True
    return False


def frozen_adapter_reference(policy, average):
    """Reference = the policy with a frozen copy of its starting adapter (no copy of the base weights)."""
    active = policy.active_adapter
    if REFERENCE_ADAPTER not in policy.peft_config:
        policy.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(policy.peft_config[active]))
        state = {
            name.replace(f".{active}.", f".{REFERENCE_ADAPTER}."): p.detach().clone()
            for name, p in policy.named_parameters()
            if f".{active}." in name
        }
        params = dict(policy.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
    policy.set_adapter(active)  # peft: the active adapter trainable, the reference copy frozen

    @contextlib.contextmanager
    def through_reference():
        policy.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            policy.set_adapter(active)

    @torch.no_grad()
    def adapter_reference(batch):
        was_training = policy.training
        policy.eval()
        with through_reference():
            logps = sequence_logps(policy, batch, average=average)[0]
        policy.train(was_training)
        return logps

    return adapter_reference


def prepare_reference(policy, settings, encoded_sets, *, pad_token_id, batch_size, average, cache_dir):
    """The reference for a run whose policy starts as the reference (`settings`: `model.reference`).

    "precompute" (and "auto") fills `reference_logps` into every record of `encoded_sets` (cached on disk
    under `settings.cache_dir` or `cache_dir`) and returns None: batches then carry `reference_logps`.
    "frozen" / "adapter" return a live `reference_fn(batch)`. The reference is the policy as it is now: a
    fresh LoRA adapter (B = 0) leaves the base model unchanged, a trained starting adapter is part of it."""
    is_peft = hasattr(policy, "disable_adapter")
    strategy = resolve_strategy(settings.strategy, is_peft)
    if strategy == "adapter" and adapter_changes_model(policy):  # disabling it would give the base model
        return frozen_adapter_reference(policy, average)
    if strategy != "precompute":
        return live_reference(
            strategy, policy, None if strategy == "adapter" else copy.deepcopy(policy), average
        )
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
