"""The reviews world: a text world with known ground truth for the DPO, MPO and EM-DPO demos.

    world = ReviewsWorld(seed=0, quick=True)
    model, tokenizer = world.reference()                         # tiny GPT-2, SFT-trained once, cached
    records, types = world.preference_data(world.train_prompts * 50, {"enthusiast": 0.5, "critic": 0.5})
    metrics = world.evaluate(policy, model, target_type="enthusiast")

* language: short restaurant reviews from a grammar (`reviews_grammar.py`), word-level tokenizer.
* reference policy: a GPT-2 (~120k parameters) trained on grammar samples by a short plain SFT loop,
  cached under `$PREFALIGN_CACHE` (default `~/.cache/prefalign`) `/reviews/<hash of config+grammar+seed>/`.
* annotator types: deterministic ground-truth rewards of a response's text (`TYPES`), which conflict.
* preference data: candidates sampled from the reference, ranked by annotators with hidden types through
  Plackett-Luce on their type's reward.
* evaluation: true reward per type, KL(pi || pi_ref) by sampling, win rate against the reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from prefalign.core import console, sources
from prefalign.core.data import PreferenceRecord
from prefalign.core.logprobs import collate, encode_records, generate_responses, sequence_logps
from prefalign.worlds import reviews_grammar as grammar

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass(frozen=True)
class ReferenceConfig:
    """Model size and SFT schedule of the reference policy (all of it is part of the cache key)."""

    n_layer: int = 2  # 2 x 64 learns the grammar better per CPU second than 3 x 96 or 4 x 128
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    sft_steps: int = 700
    batch_size: int = 32
    lr: float = 5e-3
    warmup_steps: int = 50


QUICK_REFERENCE = ReferenceConfig(sft_steps=200, warmup_steps=30)  # weaker, for tests and --quick demos


# ---------------------------------------------------------------- tokenizer and model


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the grammar's vocabulary; left padding (for generation); no BOS."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + grammar.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # keep " ." as is: decode(encode(text)) == text
    )


def build_model(cfg: ReferenceConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def sft_batch(tokenizer, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
    """prompt + response + EOS, right-padded; labels only on response tokens and EOS."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    rows = [(p, r + [tokenizer.eos_token_id]) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        attention_mask[i, : len(p) + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_reference(cfg: ReferenceConfig, seed: int = 0, progress: bool = True):
    """SFT a fresh tiny GPT-2 on grammar samples (fresh samples every step, all 40 subjects)."""
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer, seed)
    rng = np.random.default_rng(seed)
    prompts = [grammar.prompt_of(s) for s, _ in grammar.SUBJECTS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.1 + 0.45 * (
            1 + math.cos(math.pi * (step - cfg.warmup_steps) / (cfg.sft_steps - cfg.warmup_steps))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    bar = console.progress(range(cfg.sft_steps), desc="reviews: SFT reference", disable=not progress)
    # One thread: the float sums then do not depend on the machine's core count, so every machine trains
    # (and caches) the same reference and the demos' numbers reproduce; the model is too small to gain more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The model trains with GPT-2's dropout, drawn from torch's global RNG: seeded here (the caller's RNG state
    # is restored after), or the weights depend on whatever the process drew before (issue 11, fault 15b).
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in bar:
                batch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=cfg.batch_size)]
                batch = sft_batch(
                    tokenizer, batch_prompts, [grammar.sample_review(rng, p) for p in batch_prompts]
                )
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tokenizer


def reference_key(cfg: ReferenceConfig, seed: int) -> str:
    blob = json.dumps(
        # "sft": bump when train_reference changes (v2: single-threaded, reproducible across machines; v3:
        # dropout drawn from a generator seeded by `seed`, reproducible within and across processes)
        {"config": asdict(cfg), "seed": seed, "grammar": grammar.grammar_hash(), "sft": "v3"},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_reference(seed: int = 0, quick: bool = False, cfg: ReferenceConfig | None = None, progress=True):
    """(model, tokenizer) of the reference policy: loaded from the cache, or trained once and cached.

    The cache entry is written to a temporary folder and renamed into place, so a concurrent or
    interrupted run never leaves a half-written model behind.
    """
    cfg = cfg or (QUICK_REFERENCE if quick else ReferenceConfig())
    path = sources.cache_root() / "reviews" / reference_key(cfg, seed)
    if not path.is_dir():
        name = "world:reviews" + ("-quick" if cfg == QUICK_REFERENCE else "")
        seconds = round(cfg.sft_steps * 0.12)  # measured: 700 steps in ~85 s on one CPU thread
        console.say(
            f"{name}: first use on this machine: training its reference policy ({cfg.sft_steps} SFT steps, "
            f"about {seconds} s on a CPU), cached in {path}"
        )
        model, tokenizer = train_reference(cfg, seed, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "reference_config.json").write_text(json.dumps({**asdict(cfg), "seed": seed}, indent=2))
        try:
            tmp.rename(path)
        except OSError:  # another process cached the same model first
            shutil.rmtree(tmp, ignore_errors=True)
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


# ---------------------------------------------------------------- annotator types (ground truth)


def enthusiast(text: str) -> float:
    """Positive sentiment: tanh of the mean clause sentiment (0 for text without a clause)."""
    scores = [score for _, score in grammar.parse(text)]
    return float(np.tanh(np.mean(scores))) if scores else 0.0


def critic(text: str) -> float:
    """Exactly the negation of `enthusiast` (the two-opposite-types identifiability experiment)."""
    return -enthusiast(text)


def concise(text: str) -> float:
    """Short reviews: +1 at <= 4 words, -1 at >= 20, linear between. A review must say something:
    text without any clause scores -1 (so the empty response is not the optimum)."""
    if not grammar.parse(text):
        return -1.0
    return float(np.clip((12 - grammar.n_words(text)) / 8, -1.0, 1.0))


def foodie(text: str) -> float:
    """Talks about food, not service or price: (food clauses - service/price clauses) / clauses."""
    topics = [topic for topic, _ in grammar.parse(text)]
    if not topics:
        return 0.0
    return (sum(t == "food" for t in topics) - sum(t in ("service", "price") for t in topics)) / len(topics)


TYPES = {"enthusiast": enthusiast, "critic": critic, "concise": concise, "foodie": foodie}


def true_reward(type_name: str, responses: list[str]) -> np.ndarray:
    if type_name not in TYPES:
        raise ValueError(f"unknown annotator type {type_name!r}; known: {sorted(TYPES)}")
    return np.array([TYPES[type_name](r) for r in responses], dtype=np.float64)


# ---------------------------------------------------------------- preference data


def _population(population: dict[str, float] | str) -> dict[str, float]:
    population = {population: 1.0} if isinstance(population, str) else dict(population)
    unknown = sorted(set(population) - set(TYPES))
    if unknown:
        raise ValueError(f"population: unknown annotator types {unknown}; known: {sorted(TYPES)}")
    if any(not p >= 0 for p in population.values()) or sum(population.values()) <= 0:
        raise ValueError(f"population: proportions must be >= 0 and not all 0, got {population}")
    total = sum(population.values())
    return {name: p / total for name, p in population.items()}


def assign_types(population: dict[str, float], n_annotators: int, rng: np.random.Generator) -> list[str]:
    """Hidden types in the population's exact proportions (largest remainder), in random order."""
    quotas = {name: p * n_annotators for name, p in population.items()}
    counts = {name: int(q) for name, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda name: counts[name] - quotas[name])
    for name in by_remainder[: n_annotators - sum(counts.values())]:
        counts[name] += 1
    types = [name for name, count in counts.items() for _ in range(count)]
    return [types[i] for i in rng.permutation(n_annotators)]


def rank(rewards: np.ndarray, temperature: float, deterministic: bool, rng: np.random.Generator) -> list[int]:
    """Plackett-Luce ranking (best first) with utilities rewards / temperature, by the Gumbel trick:
    sorting utilities + independent Gumbel noise samples exactly from Plackett-Luce. `deterministic`:
    highest reward first, ties by index."""
    if deterministic:
        return np.argsort(-rewards, kind="stable").tolist()
    return np.argsort(-(rewards / temperature + rng.gumbel(size=len(rewards))), kind="stable").tolist()


def sample_candidates(model, tokenizer, prompts, n_responses, max_new_tokens, seed, max_tries=8):
    """n distinct, non-empty reference samples per prompt: the records then pass `data.py`'s validation
    (an empty or repeated response is a data error there). Records with a bad draw are redrawn with a
    derived seed, so the result stays a deterministic function of `seed`."""

    def bad(responses):
        return any(not r.strip() for r in responses) or len(set(responses)) < len(responses)

    candidates = generate_responses(
        model, tokenizer, prompts, n_responses, max_new_tokens, seed=seed, batch_size=256
    )
    for attempt in range(1, max_tries + 1):
        redo = [i for i, responses in enumerate(candidates) if bad(responses)]
        if not redo:
            return candidates
        again = generate_responses(
            model,
            tokenizer,
            [prompts[i] for i in redo],
            n_responses,
            max_new_tokens,
            seed=seed * 1009 + attempt,
            batch_size=256,
        )
        for i, responses in zip(redo, again):
            candidates[i] = responses
    raise RuntimeError(f"{len(redo)} prompts still had empty or repeated samples after {max_tries} redraws")


def preference_data(
    model,
    tokenizer,
    prompts: list[str],
    population: dict[str, float] | str,
    n_responses: int = 2,
    records_per_annotator: int = 1,
    n_annotators: int | None = None,
    ranking: str = "full",
    temperature: float = 1.0,
    deterministic: bool = False,
    seed: int = 0,
    max_new_tokens: int = 48,
):
    """-> (records: list[PreferenceRecord], annotator_types: {annotator id: hidden type}).

    Record prompts: with `n_annotators=None`, one record per entry of `prompts`, in order (repeat the list
    for more data), consecutive blocks of `records_per_annotator` records sharing an annotator; with
    `n_annotators` given, n_annotators * records_per_annotator records on prompts drawn uniformly from
    `prompts`. Candidates: `n_responses` samples of the reference `model` at temperature 1 (duplicates
    possible). Annotator types: the population's proportions, exactly up to rounding. Rankings: Plackett-Luce
    over the type's true reward / `temperature` (lower = sharper); `ranking="top1"` keeps the top choice only.
    """
    if ranking not in ("full", "top1"):
        raise ValueError(f"ranking must be 'full' or 'top1', got {ranking!r}")
    if n_responses < 2 or records_per_annotator < 1 or not temperature > 0:
        raise ValueError("need n_responses >= 2, records_per_annotator >= 1 and temperature > 0")
    population = _population(population)
    rng = np.random.default_rng(seed)
    if n_annotators is None:
        record_prompts = list(prompts)
        n_annotators = math.ceil(len(record_prompts) / records_per_annotator)
    else:
        record_prompts = [
            prompts[i] for i in rng.integers(len(prompts), size=n_annotators * records_per_annotator)
        ]
    types = assign_types(population, n_annotators, rng)
    annotator_types = {f"annotator-{i}": t for i, t in enumerate(types)}
    candidates = sample_candidates(model, tokenizer, record_prompts, n_responses, max_new_tokens, seed)
    records = []
    for j, (prompt, responses) in enumerate(zip(record_prompts, candidates)):
        annotator = f"annotator-{j // records_per_annotator}"
        order = rank(true_reward(annotator_types[annotator], responses), temperature, deterministic, rng)
        records.append(
            PreferenceRecord(prompt, responses, order[:1] if ranking == "top1" else order, annotator)
        )
    return records, annotator_types


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def _logps(model, tokenizer, prompts, samples, batch_records=16) -> np.ndarray:
    """Summed log p(sample + EOS | prompt) under `model`, [len(prompts), n_samples]."""
    records = [PreferenceRecord(p, s, list(range(len(s)))) for p, s in zip(prompts, samples)]
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(records), batch_records):
        encoded = encode_records(
            tokenizer, records[start : start + batch_records], max_length=128, max_prompt_length=32
        )
        out.append(sequence_logps(model, collate(encoded, tokenizer.pad_token_id))[0].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: list[str],
    n_samples_per_prompt: int = 8,
    target_type: str = "enthusiast",
    seed: int = 0,
    max_new_tokens: int = 48,
) -> dict:
    """Ground-truth metrics of `policy` on `prompts`, samples at temperature 1:

    true_reward: {type: mean true reward of policy samples} (reference_true_reward: the same for the reference)
    kl: KL(pi || pi_ref) ~ mean over y ~ pi of log pi(y|x) - log pi_ref(y|x), scored on the re-tokenized text
        (exact for this word-level tokenizer unless a sample hit max_new_tokens: `truncated` is that fraction)
    win_rate: P(r(y_pi) > r(y_ref)) + P(tie) / 2 for target_type, all policy x reference pairs per prompt
    length: mean words of policy samples
    """
    policy_samples = generate_responses(
        policy, tokenizer, prompts, n_samples_per_prompt, max_new_tokens, seed=seed
    )
    ref_samples = generate_responses(
        reference, tokenizer, prompts, n_samples_per_prompt, max_new_tokens, seed=seed + 1
    )
    flat_policy = [s for samples in policy_samples for s in samples]
    flat_ref = [s for samples in ref_samples for s in samples]
    log_ratio = _logps(policy, tokenizer, prompts, policy_samples) - _logps(
        reference, tokenizer, prompts, policy_samples
    )
    shape = (len(prompts), n_samples_per_prompt)
    r_policy = true_reward(target_type, flat_policy).reshape(shape)
    r_ref = true_reward(target_type, flat_ref).reshape(shape)
    diff = r_policy[:, :, None] - r_ref[:, None, :]
    win_rates = {}
    for name in TYPES:  # P(r(y_pi) > r(y_ref)) + P(tie) / 2 under every type's reward
        d = (
            true_reward(name, flat_policy).reshape(shape)[:, :, None]
            - true_reward(name, flat_ref).reshape(shape)[:, None, :]
        )
        win_rates[name] = float((d > 0).mean() + 0.5 * (d == 0).mean())
    n_tokens = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in flat_policy]
    return {
        "true_reward": {name: float(true_reward(name, flat_policy).mean()) for name in TYPES},
        "reference_true_reward": {name: float(true_reward(name, flat_ref).mean()) for name in TYPES},
        "kl": float(log_ratio.mean()),
        "win_rate": float((diff > 0).mean() + 0.5 * (diff == 0).mean()),
        "win_rate_by_type": win_rates,
        "length": float(np.mean([grammar.n_words(s) for s in flat_policy])),
        "truncated": float(np.mean([n >= max_new_tokens for n in n_tokens])),
        "target_type": target_type,
        "examples": [(p, s[0]) for p, s in zip(prompts[:3], policy_samples[:3])],
    }


# ---------------------------------------------------------------- the world


@dataclass
class ReviewsWorld:
    """The world in one object: prompts, tokenizer, reference, data and evaluation with its seed."""

    seed: int = 0
    quick: bool = False
    train_prompts: list[str] = field(
        default_factory=lambda: [grammar.prompt_of(s) for s, _ in grammar.TRAIN_SUBJECTS]
    )
    eval_prompts: list[str] = field(
        default_factory=lambda: [grammar.prompt_of(s) for s, _ in grammar.EVAL_SUBJECTS]
    )

    def reference(self):
        """(model, tokenizer): a fresh copy each call, so training one never changes another."""
        return load_reference(self.seed, self.quick)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return build_tokenizer()

    def preference_data(self, prompts, population, **kwargs):
        model, tokenizer = self.reference()
        return preference_data(model, tokenizer, prompts, population, **{"seed": self.seed, **kwargs})

    def evaluate(self, policy, reference=None, prompts=None, **kwargs) -> dict:
        reference, tokenizer = (reference, build_tokenizer()) if reference is not None else self.reference()
        prompts = self.eval_prompts if prompts is None else prompts
        return evaluate_policy(policy, reference, tokenizer, prompts, **{"seed": self.seed, **kwargs})


MEASURES = (
    "true_reward: mean ground-truth reward (in [-1, 1]) of policy samples on the {n} held-out prompts, "
    "{k} samples each at temperature 1",
    "win_rate: P(a policy sample's reward > a reference sample's on the same prompt) + P(tie) / 2; "
    "0.5 = no better than the reference",
    "kl: KL(policy || reference) in nats per response, estimated on the policy's samples",
)


def evaluate_against_reference(
    policy, reference, n_samples_per_prompt: int = 32, seed: int = 0, annotator_types: dict | None = None
) -> dict:
    """The world's ground truth for `prefalign eval`: every type's true reward and win rate against the
    reference on the held-out prompts, and KL(π‖π_ref). With `annotator_types` ({type: share}, the
    population that labelled the run's data) also `true_reward`, `reference_true_reward` and `win_rate`
    for that population (share-weighted means over its types)."""
    world = ReviewsWorld(seed=seed)
    m = world.evaluate(policy, reference, n_samples_per_prompt=n_samples_per_prompt)
    out = {f"true_reward/{t}": v for t, v in m["true_reward"].items()}
    out.update({f"reference_true_reward/{t}": v for t, v in m["reference_true_reward"].items()})
    out.update({f"win_rate/{t}": v for t, v in m["win_rate_by_type"].items()})
    out["kl"] = m["kl"]
    notes = [line.format(n=len(world.eval_prompts), k=n_samples_per_prompt) for line in MEASURES]
    if annotator_types:
        shares = _population(annotator_types)
        out["annotator_types"] = ", ".join(f"{t} {p:g}" for t, p in shares.items())
        for key, by_type in (("true_reward", m["true_reward"]), ("reference_true_reward", m["reference_true_reward"]),
                             ("win_rate", m["win_rate_by_type"])):  # fmt: skip
            out[key] = sum(p * by_type[t] for t, p in shares.items())
        notes.insert(
            0, f"annotators of the data: {out['annotator_types']}; true_reward and win_rate are theirs"
        )
    else:
        notes.insert(
            0, "annotator type of the data unknown: true_reward/<type> and win_rate/<type> for every type"
        )
    out["notes"] = notes
    return out


sources.register("world:reviews", "causal_lm", lambda: load_reference(0, quick=False), evaluate_against_reference,
                 "the reviews world's SFT reference policy (tiny GPT-2, trained once, cached)")  # fmt: skip
sources.register("world:reviews-quick", "causal_lm", lambda: load_reference(0, quick=True), evaluate_against_reference,
                 "a shorter-trained reviews reference, for tests and quick demos")  # fmt: skip
