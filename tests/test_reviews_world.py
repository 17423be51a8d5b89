"""The reviews world: language, tokenizer, cached reference, ground-truth rewards, preference data, evaluation.

One quick reference is trained per session into a temporary cache (about 10-30 s on 2 cores).
"""

import copy
import os

import numpy as np
import pytest
import torch

from prefalign.core import sources
from prefalign.core.logprobs import generate_responses
from prefalign.worlds import reviews as rv
from prefalign.worlds import reviews_grammar as grammar


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A quick world whose reference is trained once into a fresh cache folder."""
    cache = tmp_path_factory.mktemp("prefalign-cache")
    previous = os.environ.get("PREFALIGN_CACHE")
    os.environ["PREFALIGN_CACHE"] = str(cache)
    world = rv.ReviewsWorld(seed=0, quick=True)
    world.reference()
    yield world
    if previous is None:
        os.environ.pop("PREFALIGN_CACHE")
    else:
        os.environ["PREFALIGN_CACHE"] = previous


@pytest.fixture(scope="session")
def reference_samples(world):
    model, tokenizer = world.reference()
    prompts = world.train_prompts + world.eval_prompts
    samples = generate_responses(model, tokenizer, prompts, n_per_prompt=12, max_new_tokens=48, seed=0)
    return [s for per_prompt in samples for s in per_prompt]


def grammar_samples(n, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [grammar.prompt_of(s) for s, _ in grammar.SUBJECTS]
    return [grammar.sample_review(rng, prompts[i % len(prompts)]) for i in range(n)]


# ---------------------------------------------------------------- language and tokenizer


def test_tokenizer_round_trips_grammar_text_without_unknown_words():
    tokenizer = rv.build_tokenizer()
    texts = grammar_samples(500) + [grammar.prompt_of(s) for s, _ in grammar.SUBJECTS]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text
    assert 200 <= len(tokenizer) <= 400
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len({len(tokenizer(grammar.prompt_of(s))["input_ids"]) for s, _ in grammar.SUBJECTS}) == 1
    assert not set(grammar.TRAIN_SUBJECTS) & set(grammar.EVAL_SUBJECTS)


def test_grammar_is_diverse():
    texts = grammar_samples(2000)
    sentiment = rv.true_reward("enthusiast", texts)
    lengths = np.array([grammar.n_words(t) for t in texts])
    assert (sentiment > 0.3).mean() > 0.25 and (sentiment < -0.3).mean() > 0.25
    assert lengths.min() <= 4 and lengths.max() >= 18
    topics = {topic for t in texts[:200] for topic, _ in grammar.parse(t)}
    assert topics == {"food", "service", "price", "ambience", None}
    assert len(set(texts)) > 0.9 * len(texts)


# ---------------------------------------------------------------- ground-truth rewards


def test_parse_and_rewards_by_hand():
    """Clause score = product of modifiers x sentiment word, clipped to ±1.5:
    "very delicious" = 1.4 x 1.0 = 1.4; "not bad" = -0.6 x -0.6 = 0.36; "extremely so rude" =
    1.7 x 1.5 x -1.0 = -2.55 -> clipped -1.5. enthusiast = tanh(mean clause score)."""
    assert grammar.parse("the food was very delicious .") == [("food", pytest.approx(1.4))]
    assert grammar.parse("the staff were not bad") == [("service", pytest.approx(0.36))]
    assert grammar.parse("the waiter was extremely so rude .") == [("service", -1.5)]
    text = "the ramen was very delicious . the prices are not bad , but the room was dirty ."
    # clauses: food 1.4, price 0.36, ambience -0.9 -> mean 0.2867; 15 words; foodie (1 - 1) / 3
    assert rv.enthusiast(text) == pytest.approx(np.tanh((1.4 + 0.36 - 0.9) / 3))
    assert rv.critic(text) == -rv.enthusiast(text)
    assert rv.concise(text) == pytest.approx((12 - 15) / 8)
    assert rv.foodie(text) == pytest.approx(0.0)
    assert rv.concise("the food was good .") == 1.0  # 4 words
    assert rv.foodie("i loved the sushi . the decor was nice .") == pytest.approx(0.5)
    # text without any clause: neutral sentiment, no topic, and not "concise" (the empty review is bad)
    for empty in ["", "the the and .", "<unk> hello , but"]:
        assert (rv.enthusiast(empty), rv.concise(empty), rv.foodie(empty)) == (0.0, -1.0, 0.0)
    with pytest.raises(ValueError, match="unknown annotator type 'snob'"):
        rv.true_reward("snob", ["the food was good ."])


def test_reward_types_conflict_on_reference_samples(reference_samples):
    rewards = np.stack([rv.true_reward(name, reference_samples) for name in rv.TYPES])
    corr = np.corrcoef(rewards)
    names = list(rv.TYPES)
    e, c = names.index("enthusiast"), names.index("critic")
    assert corr[e, c] == pytest.approx(-1.0)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if {i, j} != {e, c}:
                assert abs(corr[i, j]) < 0.35, (names[i], names[j], corr[i, j])
    # the reference itself is diverse: room for preferences to move it either way
    sentiment = rewards[e]
    assert (sentiment > 0.3).mean() > 0.2 and (sentiment < -0.3).mean() > 0.2


# ---------------------------------------------------------------- reference model and cache


def test_reference_is_small_cached_and_speaks_the_language(world, reference_samples):
    model, tokenizer = world.reference()
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    path = sources.cache_root() / "reviews" / rv.reference_key(rv.QUICK_REFERENCE, 0)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert rv.reference_key(rv.QUICK_REFERENCE, 0) != rv.reference_key(rv.ReferenceConfig(), 0)
    assert rv.reference_key(rv.QUICK_REFERENCE, 0) != rv.reference_key(rv.QUICK_REFERENCE, 1)
    again, _ = world.reference()  # loaded from the cache: same weights, a separate copy
    assert again is not model
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # samples are reviews: every word known, nearly all parse into clauses, lengths like the grammar's
    vocabulary = set(grammar.vocabulary())
    assert all(set(s.split()) <= vocabulary for s in reference_samples)
    assert np.mean([len(grammar.parse(s)) > 0 for s in reference_samples]) > 0.95
    lengths = [grammar.n_words(s) for s in reference_samples]
    assert abs(np.mean(lengths) - np.mean([grammar.n_words(t) for t in grammar_samples(2000)])) < 3


# ---------------------------------------------------------------- preference data


def test_plackett_luce_sampling_matches_softmax_probabilities():
    """P(item i ranked first) = exp(r_i / T) / sum_j exp(r_j / T); P(0 > 1 > 2) = softmax product."""
    rng = np.random.default_rng(0)
    rewards, temperature, n = np.array([1.0, 0.0, -0.5]), 0.5, 20000
    rankings = np.array([rv.rank(rewards, temperature, False, rng) for _ in range(n)])
    p = np.exp(rewards / temperature) / np.exp(rewards / temperature).sum()
    assert np.bincount(rankings[:, 0], minlength=3) / n == pytest.approx(p, abs=0.012)
    full = p[0] * np.exp(0.0 / temperature) / (np.exp(0.0) + np.exp(-0.5 / temperature))
    assert np.mean((rankings == [0, 1, 2]).all(1)) == pytest.approx(full, abs=0.012)
    assert rv.rank(np.array([0.2, 0.5, 0.2]), 1.0, True, rng) == [1, 0, 2]  # ties by index


def test_types_are_assigned_in_exact_proportions():
    rng = np.random.default_rng(0)
    types = rv.assign_types({"enthusiast": 0.8, "critic": 0.2}, 10, rng)
    assert sorted(types) == ["critic"] * 2 + ["enthusiast"] * 8
    assert len(rv.assign_types({"enthusiast": 1 / 3, "critic": 1 / 3, "foodie": 1 / 3}, 7, rng)) == 7


def test_preference_data_is_seeded_and_follows_the_types(world):
    model, tokenizer = world.reference()
    prompts = world.train_prompts * 2
    kwargs = dict(n_responses=3, records_per_annotator=2, temperature=0.05, seed=3)
    records, types = rv.preference_data(
        model, tokenizer, prompts, {"enthusiast": 0.5, "critic": 0.5}, **kwargs
    )
    again, types_again = rv.preference_data(
        model, tokenizer, prompts, {"enthusiast": 0.5, "critic": 0.5}, **kwargs
    )
    assert records == again and types == types_again
    other, _ = rv.preference_data(
        model, tokenizer, prompts, {"enthusiast": 0.5, "critic": 0.5}, **{**kwargs, "seed": 4}
    )
    assert other != records
    assert len(records) == len(prompts) and len(types) == len(prompts) // 2
    assert sorted(types.values()) == ["critic"] * 16 + ["enthusiast"] * 16
    assert [r.prompt for r in records] == prompts
    assert records[0].annotator == records[1].annotator != records[2].annotator
    # at temperature 0.05, rewards 0.2 apart are misordered with probability <= 1 / (1 + e^4) = 0.018
    agree = []
    for record in records:
        assert len(record.responses) == 3 and sorted(record.ranking) == [0, 1, 2]
        r = rv.true_reward(types[record.annotator], [record.responses[i] for i in record.ranking])
        if np.abs(np.diff(np.sort(r))).min() >= 0.2:
            agree.append(bool(np.all(np.diff(r) < 0)))
    assert np.mean(agree) > 0.9

    top1, _ = rv.preference_data(
        model, tokenizer, prompts, "enthusiast", ranking="top1", n_responses=3, deterministic=True
    )
    for record in top1:
        r = rv.true_reward("enthusiast", record.responses)
        assert record.ranking == [int(np.argmax(r))]
    drawn, drawn_types = rv.preference_data(
        model, tokenizer, prompts, "foodie", n_annotators=5, records_per_annotator=4
    )
    assert len(drawn) == 20 and set(drawn_types.values()) == {"foodie"}
    assert {r.prompt for r in drawn} <= set(prompts) and len(drawn[0].responses) == 2

    with pytest.raises(ValueError, match="unknown annotator types \\['snob'\\]"):
        rv.preference_data(model, tokenizer, prompts, {"snob": 1.0})
    with pytest.raises(ValueError, match="ranking must be"):
        rv.preference_data(model, tokenizer, prompts, "critic", ranking="top2")


# ---------------------------------------------------------------- evaluation


def test_evaluating_the_reference_against_itself(world):
    model, tokenizer = world.reference()
    metrics = world.evaluate(model, model, prompts=world.eval_prompts, n_samples_per_prompt=16)
    assert abs(metrics["kl"]) < 1e-5
    assert metrics["win_rate"] == pytest.approx(0.5, abs=0.06)  # two independent sample sets
    assert metrics["true_reward"]["critic"] == -metrics["true_reward"]["enthusiast"]
    assert 4 < metrics["length"] < 16 and metrics["truncated"] < 0.02
    assert metrics == world.evaluate(model, model, prompts=world.eval_prompts, n_samples_per_prompt=16)


def test_a_more_positive_policy_scores_higher_with_positive_kl(world):
    """Fine-tune the reference a few steps on positive grammar reviews: enthusiast reward and win rate go
    up, critic reward down, and KL(pi || ref) is clearly positive (a Monte-Carlo estimate of a KL)."""
    reference, tokenizer = world.reference()
    policy = copy.deepcopy(reference).train()
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    prompts = [grammar.prompt_of(s) for s, _ in grammar.TRAIN_SUBJECTS]
    for _ in range(25):
        batch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=32)]
        texts = []
        for p in batch_prompts:
            text = grammar.sample_review(rng, p)
            while rv.enthusiast(text) < 0.5:
                text = grammar.sample_review(rng, p)
            texts.append(text)
        policy(**rv.sft_batch(tokenizer, batch_prompts, texts)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.eval()
    better = world.evaluate(policy, reference, n_samples_per_prompt=16)
    same = world.evaluate(reference, reference, n_samples_per_prompt=16)
    assert better["true_reward"]["enthusiast"] > same["true_reward"]["enthusiast"] + 0.25
    assert better["true_reward"]["critic"] < same["true_reward"]["critic"] - 0.25
    assert better["win_rate"] > 0.65
    assert better["kl"] > 0.1


def test_preference_data_always_passes_validation(world, tmp_path):
    """Saved world data loads through data.py: no empty or repeated candidates (they are redrawn)."""
    from prefalign.core.data import load_preferences, save_jsonl

    records, _ = world.preference_data(world.train_prompts * 6, "enthusiast", n_responses=3, seed=3)
    assert all(r.strip() for rec in records for r in rec.responses)
    assert all(len(set(rec.responses)) == 3 for rec in records)
    path = save_jsonl(records, tmp_path / "world.jsonl")
    assert [r.to_dict() for r in load_preferences(path)] == [r.to_dict() for r in records]
