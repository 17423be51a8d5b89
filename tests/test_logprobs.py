from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from prefalign.core.logprobs import EncodedRecord, collate, encode_records, generate_responses, sequence_logps

torch.set_num_threads(1)


@dataclass
class Record:  # the PreferenceRecord signature, duck-typed
    prompt: object
    responses: list
    ranking: list
    annotator: str | None = None
    weight: float = 1.0


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE trained on a few strings: ' hello' and ' world' are single tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["Say hello world"] * 50 + ["the cat sat on the mat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    return GPT2LMHeadModel(config).eval()


def test_prompt_response_boundary_is_exact_where_joint_tokenization_merges(tokenizer):
    """Joined, 'Say hel' + 'lo world' tokenizes as 'Say',' hello',' world': ' hel|lo' merge across the
    boundary. Ours keeps the prompt's own tokens and the response's own tokens, then one EOS."""
    prompt, response = "Say hel", "lo world"
    joint = tokenizer(prompt + response)["input_ids"]
    separate = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    assert joint != separate  # the tokenizer really merges across the boundary
    [record] = encode_records(tokenizer, [Record(prompt, [response, "x"], [0, 1])])
    assert record.prompt_ids == tokenizer(prompt)["input_ids"]
    assert record.response_ids[0][:-1] == tokenizer(response, add_special_tokens=False)["input_ids"]
    assert record.response_ids[0][-1] == tokenizer.eos_token_id
    batch = collate([record], tokenizer.pad_token_id)
    ids = batch["input_ids"][0][batch["response_mask"][0].bool()].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=True) == response


def test_eos_appended_once(tokenizer):
    [record] = encode_records(tokenizer, [Record("Say", [" hello<eos>", " world"], [1, 0])])
    eos = tokenizer.eos_token_id
    assert [ids.count(eos) for ids in record.response_ids] == [1, 1]
    assert all(ids[-1] == eos for ids in record.response_ids)


def test_real_preference_record_and_empty_prompt(tokenizer):
    """data.PreferenceRecord encodes like the duck-typed record; an empty prompt starts from EOS
    (this tokenizer has no BOS) so the first response token is scored."""
    from prefalign.core.data import PreferenceRecord

    [encoded] = encode_records(tokenizer, [PreferenceRecord("", [" hello", " world"], [1], "ann-3", 0.5)])
    assert encoded.prompt_ids == [tokenizer.eos_token_id]
    assert (encoded.ranking, encoded.annotator, encoded.weight) == ([1], "ann-3", 0.5)


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    prompt = "the cat sat on the mat " * 4
    [record] = encode_records(tokenizer, [Record(prompt, [prompt, prompt], [0])], 12, 5)
    full_prompt = tokenizer(prompt)["input_ids"]
    full_response = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 5 and len(full_response) > 7
    assert record.prompt_ids == full_prompt[-5:]
    assert record.response_ids[0] == full_response[:7]  # 12 - 5, EOS cut off
    with pytest.raises(ValueError, match=r"record 1, field 'responses\[0\]'.*max_length=12"):
        encode_records(
            tokenizer, [Record("Say", ["a", "b"], [0]), Record(prompt, [prompt, "b"], [0])], 12, 5, "error"
        )


def test_chat_prompt_and_conversational_response(tokenizer):
    tokenizer = tokenizer.__class__(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>"
    )
    messages = [{"role": "user", "content": "Say hel"}]
    answer = [{"role": "assistant", "content": "lo world"}]
    record = Record(messages, [answer, "plain text"], [0, 1])
    with pytest.raises(ValueError, match="record 0, field 'prompt'.*no chat_template"):
        encode_records(tokenizer, [record])
    tokenizer.chat_template = CHAT_TEMPLATE
    [encoded] = encode_records(tokenizer, [record])
    assert tokenizer.decode(encoded.prompt_ids) == "<user>Say hel\n<assistant>"
    # the response is the text the template adds after the generation prompt
    assert tokenizer.decode(encoded.response_ids[0]) == "lo world\n<eos>"
    assert tokenizer.decode(encoded.response_ids[1]) == "plain text<eos>"
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"responses\[0\]'.*does not start with"):
        encode_records(tokenizer, [record])
    with pytest.raises(ValueError, match="conversational response needs a conversational"):
        encode_records(tokenizer, [Record("text prompt", [answer, "b"], [0])])


def test_collate_layout():
    records = [
        EncodedRecord(
            [5, 6], [[7, 1], [8, 9, 1]], [1, 0], weight=2.0, annotator="a", reference_logps=[-1.0, -2.0]
        ),
        EncodedRecord([5], [[7, 1], [8, 1], [9, 1]], [2], reference_logps=[-3.0, -4.0, -5.0]),
    ]
    batch = collate(records, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 1, 0],
        [5, 6, 8, 9, 1],
        [5, 7, 1, 0, 0],
        [5, 8, 1, 0, 0],
        [5, 9, 1, 0, 0],
    ]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    assert batch["response_mask"].tolist()[:3] == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["candidate_index"].tolist() == [[0, 1, -1], [2, 3, 4]]
    assert batch["ranking"].tolist() == [[1, 0, -1], [2, -1, -1]]
    assert batch["weight"].tolist() == [2.0, 1.0]
    assert batch["reference_logps"].tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    records[1].reference_logps = None
    assert "reference_logps" not in collate(records, 0)
    records[1].ranking = [3]
    with pytest.raises(ValueError, match="record 1 of the batch.*outside 3 responses"):
        collate(records, 0)


def brute_force_logp(model, prompt_ids, response_ids):
    """log p(response | prompt) one token at a time, one unpadded forward per prefix."""
    total = 0.0
    for t, token in enumerate(response_ids):
        prefix = torch.tensor([prompt_ids + response_ids[:t]])
        total += model(prefix).logits[0, -1].log_softmax(-1)[token].item()
    return total


@torch.no_grad()
def test_sequence_logps_match_token_by_token_brute_force(tokenizer, model):
    records = [
        Record("Say hel", ["lo world", " the cat"], [0, 1]),
        Record("the cat", [" sat", " on the mat", "x"], [2, 0]),
    ]
    encoded = encode_records(tokenizer, records)
    logps, n_tokens = sequence_logps(model, collate(encoded, tokenizer.pad_token_id))
    mean_logps, _ = sequence_logps(model, collate(encoded, tokenizer.pad_token_id), average=True)
    for b, record in enumerate(encoded):
        for j, response_ids in enumerate(record.response_ids):
            expected = brute_force_logp(model, record.prompt_ids, response_ids)
            assert logps[b, j].item() == pytest.approx(expected, abs=1e-4)
            assert n_tokens[b, j].item() == len(response_ids)
            assert mean_logps[b, j].item() == pytest.approx(expected / len(response_ids), abs=1e-5)
    assert logps[0, 2].item() == 0.0 and n_tokens[0, 2].item() == 0  # record 0 has no third candidate


@torch.no_grad()
def test_padding_invariance(tokenizer, model):
    """A record's log-probs do not depend on which (longer) candidates share its batch."""
    short = encode_records(tokenizer, [Record("Say", [" hello", " world"], [0, 1])])
    long = encode_records(
        tokenizer, [Record("the cat sat on the mat " * 3, ["the cat sat on the mat " * 3] * 3, [0])]
    )
    alone, _ = sequence_logps(model, collate(short, tokenizer.pad_token_id))
    together, _ = sequence_logps(model, collate(long + short, tokenizer.pad_token_id))
    torch.testing.assert_close(together[1, :2], alone[0], atol=1e-5, rtol=0)


def test_prompt_and_padding_positions_get_no_gradient(tokenizer, model):
    """d(sum of logps)/d(logits) is zero wherever the next token is a prompt token or padding."""
    encoded = encode_records(tokenizer, [Record("the cat sat", [" on", " the mat"], [0, 1])])
    batch = collate(encoded, tokenizer.pad_token_id)
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep_logits)
    logps, _ = sequence_logps(model, batch)
    handle.remove()
    logps.sum().backward()
    model.zero_grad()
    grad_norm = captured["logits"].grad.norm(dim=-1)  # [C, T]
    predicts_response = torch.zeros_like(batch["response_mask"], dtype=torch.bool)
    predicts_response[:, :-1] = batch["response_mask"][:, 1:].bool()
    assert (grad_norm[~predicts_response] == 0).all()
    assert (grad_norm[predicts_response] > 0).all()


def test_generate_responses_left_padding_matches_one_by_one(tokenizer, model):
    prompts = ["Say", "the cat sat on the", [{"role": "user", "content": "x"}]]
    tokenizer = tokenizer.__class__(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=0)
    one_by_one = [
        generate_responses(model, tokenizer, [p], max_new_tokens=6, temperature=0)[0] for p in prompts
    ]
    assert batched == one_by_one and all(len(r) == 1 and "<eos>" not in r[0] for r in batched)
    sampled = generate_responses(model, tokenizer, prompts, n_per_prompt=3, max_new_tokens=6, seed=1)
    assert [len(r) for r in sampled] == [3, 3, 3]
    assert sampled == generate_responses(model, tokenizer, prompts, n_per_prompt=3, max_new_tokens=6, seed=1)
    assert len({s for r in sampled for s in r}) > 3  # sampling, not greedy


def test_generation_stops_at_the_models_position_limit():
    """A prompt of 4 tokens and max_new_tokens=64 on a model with 16 positions: generation stops so that the
    response plus the EOS appended when scoring it fit in 16 positions (an IndexError before the cap)."""
    from prefalign.core.data import PreferenceRecord
    from prefalign.worlds.reviews import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_layer=1,
            n_head=2,
            n_embd=16,
            n_positions=16,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    with torch.no_grad():  # make EOS impossible so every sample runs to the limit
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        model.transformer.wte.weight[tokenizer.eos_token_id] = -100.0
    samples = generate_responses(
        model, tokenizer, ["review: the pizza place"], n_per_prompt=2, max_new_tokens=64, seed=0
    )
    encoded = encode_records(tokenizer, [PreferenceRecord("review: the pizza place", samples[0], [0, 1])])
    assert all(len(encoded[0].prompt_ids) + len(r) <= 16 for r in encoded[0].response_ids)
    model(torch.tensor([encoded[0].prompt_ids + encoded[0].response_ids[0]]))  # scoring it fits too
