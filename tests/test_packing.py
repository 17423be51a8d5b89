"""Padding-free packed log-probs equal padded ones; attention stays inside a record and a candidate."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prefalign.core.logprobs import EncodedRecord, check_packing, collate, collate_packed, sequence_logps

torch.set_num_threads(1)
V = 97


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=V,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def llama():  # rotary positions and grouped-query attention (4 query heads, 2 key/value heads)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def records(seed=0, n_records=5):
    """Records of 2 or 3 candidates (a mixed-size batch), prompts and responses of 1-20 tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo=1, hi=20):
        return torch.randint(2, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    out = []
    for b in range(n_records):
        k = 3 if b % 2 else 2
        out.append(EncodedRecord(ids(), [ids() for _ in range(k)], list(range(k))))
    return out


@pytest.mark.parametrize("make_model", [gpt2, llama])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_equals_padded_logps_and_gradients(make_model, share_prompt):
    """Same numbers, same gradients: sums to a relative 1e-5, per-token means to 1e-5 absolute."""
    model = make_model().train()
    data = records()
    padded, n_padded = sequence_logps(model, collate(data, pad_token_id=0))
    packed, n_packed = sequence_logps(model, collate_packed(data, share_prompt=share_prompt))
    assert torch.equal(n_padded, n_packed)
    assert (packed[0::2, 2] == 0).all()  # records with 2 candidates: the third slot is empty
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        packed / n_packed.clamp(min=1), padded / n_padded.clamp(min=1), rtol=0, atol=1e-5
    )
    grads = []
    for logps in (padded, packed):
        model.zero_grad()
        logps.sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_packed_layout_by_hand():
    """prompt [5, 6], responses [7, 8] and [9]: one row [5, 6, 7, 8, 9]; the second response restarts at
    position 2; response tokens 7, 8, 9 are predicted from positions 1 (prompt end), 2 (after 7), 1."""
    batch = collate_packed([EncodedRecord([5, 6], [[7, 8], [9]], [0, 1])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert batch["segment"].tolist() == [0, 0, 1, 1, 2]
    assert batch["target_position"].tolist() == [1, 2, 1]
    assert batch["target_ids"].tolist() == [7, 8, 9]
    assert batch["target_candidate"].tolist() == [0, 0, 1]


def test_attention_is_confined_to_record_and_candidate():
    """Changing candidate 1 of record 0 changes only that candidate's log-prob, in either layout."""
    model = gpt2().eval()
    data = records(n_records=3)
    changed = records(n_records=3)
    changed[0].response_ids[1] = [(t + 1) % V for t in changed[0].response_ids[1]]
    with torch.no_grad():
        before, _ = sequence_logps(model, collate_packed(data))
        after, _ = sequence_logps(model, collate_packed(changed))
    moved = (before - after).abs() > 1e-4
    assert moved[0, 1] and moved.sum() == 1


def test_check_packing_rejects_a_model_without_attention_interface():
    class OldGPT2(GPT2LMHeadModel):
        _supports_attention_backend = False

    model = OldGPT2(gpt2().config)
    with pytest.raises(ValueError, match="data.packing: false"):
        check_packing(model, records(n_records=2), pad_token_id=0)
    check_packing(gpt2(), records(n_records=2), pad_token_id=0)  # a supported model passes


def test_dpo_recipe_same_losses_packed_or_padded(tmp_path):
    """The DPO recipe's logged losses do not depend on data.packing."""
    from prefalign import runner
    from prefalign.core.data import PreferenceRecord
    from prefalign.methods import dpo
    from prefalign.worlds.reviews import build_tokenizer

    tokenizer = build_tokenizer()
    words = ["good", "bad", "pizza", "coffee", "the", "was", "."]
    words = [w for w in words if w in tokenizer.get_vocab()] or list(tokenizer.get_vocab())[5:12]
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())

    data = [PreferenceRecord.pair(text(4), text(5), text(3)) for _ in range(24)]
    curves = []
    for packing in (False, True):
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=len(tokenizer),
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cfg = dpo.Config()
        cfg.data.packing = packing
        cfg.train.output_dir = str(tmp_path / f"packing-{packing}")
        cfg.train.max_steps, cfg.train.batch_size, cfg.train.log_every = 4, 6, 1
        cfg.train.learning_rate, cfg.train.progress = 1e-2, False
        runner.run(cfg, records=data, eval_records=[], model=GPT2LMHeadModel(config), tokenizer=tokenizer)
        lines = (tmp_path / f"packing-{packing}" / "metrics.jsonl").read_text().splitlines()
        curves.append([json.loads(x)["loss"] for x in lines])
    assert len(curves[0]) == 4
    assert curves[1] == pytest.approx(curves[0], abs=1e-5)
    assert curves[0][-1] != pytest.approx(
        curves[0][0], abs=1e-3
    )  # it trained, so the comparison means something
