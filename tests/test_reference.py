import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from prefalign.core.logprobs import EncodedRecord, collate, sequence_logps
from prefalign.core.reference import live_reference, precompute_reference_logps, resolve_strategy

torch.set_num_threads(1)
VOCAB, PAD = 50, 0


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config)


def random_records(n_records=7, seed=0):
    """Records of 2-3 candidates with random token ids and lengths (EOS = 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(2, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    length = lambda: int(torch.randint(1, 9, (1,), generator=g))  # noqa: E731
    return [
        EncodedRecord(ids(length()), [ids(length()) + [1] for _ in range(2 + i % 2)], [0, 1])
        for i in range(n_records)
    ]


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_resolve_strategy():
    assert resolve_strategy("auto", is_peft=False) == "precompute"
    assert resolve_strategy("adapter", is_peft=True) == "adapter"
    assert resolve_strategy("frozen", is_peft=True) == "frozen"
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        resolve_strategy("adapter", is_peft=False)
    with pytest.raises(ValueError, match="'auto' or one of"):
        resolve_strategy("copy", is_peft=False)


def test_precompute_equals_live_and_is_cached(tmp_path):
    """Precomputed (batch size 3, length-sorted) == frozen live reference on a batch of all records;
    an identical second call is a cache hit (no forward); changed weights or changed data are misses."""
    model, records = tiny_gpt2(), random_records()
    calls = count_forwards(model)
    logps = precompute_reference_logps(model, records, batch_size=3, pad_token_id=PAD, cache_dir=tmp_path)
    assert len(calls) == 3 and [len(row) for row in logps] == [2, 3, 2, 3, 2, 3, 2]
    assert records[4].reference_logps == logps[4]
    batch = collate(records, PAD)
    live = live_reference("frozen", model)(batch)
    torch.testing.assert_close(batch["reference_logps"], live, atol=1e-5, rtol=0)
    assert live_reference("precompute", model)(batch) is batch["reference_logps"]
    calls.clear()  # the frozen deep copy carried the counting hook along

    fresh = random_records()  # same token ids, new objects: read from the cache
    assert (
        precompute_reference_logps(model, fresh, batch_size=3, pad_token_id=PAD, cache_dir=tmp_path) == logps
    )
    assert len(calls) == 0 and fresh[6].reference_logps == logps[6]

    fresh[0].ranking = [1, 0]  # the ranking does not enter the key
    precompute_reference_logps(model, fresh, batch_size=3, pad_token_id=PAD, cache_dir=tmp_path)
    assert len(calls) == 0

    fresh[0].response_ids[0][0] += 1  # changed data -> recomputed
    precompute_reference_logps(model, fresh, batch_size=3, pad_token_id=PAD, cache_dir=tmp_path)
    assert len(calls) == 3

    with torch.no_grad():  # changed weights -> recomputed, and the values follow the new weights
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.1)
    changed = precompute_reference_logps(
        model, random_records(), batch_size=3, pad_token_id=PAD, cache_dir=tmp_path
    )
    assert len(calls) == 6 and changed != logps

    precompute_reference_logps(
        model, random_records(), batch_size=3, pad_token_id=PAD, cache_dir=tmp_path, average=True
    )
    assert len(calls) == 9  # the mean-logps form has its own key
    assert len(list(tmp_path.iterdir())) == 4


def test_frozen_copy_gets_no_gradient():
    policy = tiny_gpt2().train()  # GPT-2's dropout is on in the policy, off in the frozen copy
    reference_fn = live_reference("frozen", policy)  # deep copy of the policy as it is now
    batch = collate(random_records(3), PAD)
    reference_logps = reference_fn(batch)
    assert not reference_logps.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(policy.eval(), batch)[0], reference_logps)
    policy_logps, _ = sequence_logps(policy.train(), batch)
    (policy_logps - reference_logps).sum().backward()
    assert all(p.grad is not None for p in policy.parameters())
    with torch.no_grad():
        policy.transformer.wte.weight.add_(1.0)  # training the policy does not move the copy
    torch.testing.assert_close(reference_fn(batch), reference_logps)


def test_adapter_disabled_equals_base_model():
    """A LoRA policy with non-zero adapters differs from the base model; with adapters disabled it equals it.
    The reference function also leaves the policy in training mode and its dropout off."""
    base = tiny_gpt2()
    base_copy = copy.deepcopy(base).eval()
    lora = LoraConfig(
        r=4, target_modules=["c_attn"], init_lora_weights=False, lora_dropout=0.5, fan_in_fan_out=True
    )
    policy = get_peft_model(base, lora).train()
    batch = collate(random_records(4), PAD)
    with torch.no_grad():
        expected, _ = sequence_logps(base_copy, batch)
        policy.eval()
        with_adapters, _ = sequence_logps(policy, batch)
        policy.train()
    assert (with_adapters - expected).abs().max() > 1e-3
    reference_logps = live_reference("adapter", policy)(batch)
    torch.testing.assert_close(reference_logps, expected, atol=1e-5, rtol=0)
    assert policy.training and not reference_logps.requires_grad
    with pytest.raises(ValueError, match="needs a peft.PeftModel"):
        live_reference("adapter", base_copy)
