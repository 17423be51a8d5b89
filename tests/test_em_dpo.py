"""EM-DPO: E-step math, exact-EM monotonicity, initialization, M-step wiring, bad input, end to end."""

import math

import numpy as np
import pytest
import torch

from prefalign.core.data import PreferenceRecord
from prefalign.core.encode import encode_records
from prefalign.core.errors import ConfigError, DataError
from prefalign.core.models import LoraSettings
from prefalign.core.train import TrainConfig
from prefalign.losses.lm import plackett_luce_loss, ranking_log_likelihood
from prefalign.methods.em_dpo import em as em_dpo
from prefalign.worlds.reviews import ReferenceConfig, build_model, build_tokenizer

torch.set_num_threads(1)


def test_e_step_by_hand():
    """Annotator a has records with log P = (log ½, log ¼) under types (0, 1) twice; b one record (log ¼, log ½).
    η = (½, ½). a: joint ∝ (½·¼, ½·1/16) -> γ_a = (0.8, 0.2); b: γ_b = (⅓, ⅔); new η = mean = (17/30, 13/30).
    Log-likelihood = log(½·¼ + ½·1/16) + log(½·¼ + ½·½) = log(5/32) + log(3/8)."""
    loglik = torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.25, 0.5]]).log()
    gamma, eta, total = em_dpo.e_step(loglik, torch.tensor([0, 0, 1]), 2, torch.tensor([0.5, 0.5]))
    assert torch.allclose(gamma, torch.tensor([[0.8, 0.2], [1 / 3, 2 / 3]]), atol=1e-6)
    assert torch.allclose(eta, torch.tensor([17 / 30, 13 / 30]), atol=1e-6)
    assert total == pytest.approx(math.log(5 / 32) + math.log(3 / 8), abs=1e-5)
    # a held-out mask drops the second record of a: a is then scored on one record only -> γ_a = (⅔, ⅓)
    gamma, _, _ = em_dpo.e_step(
        loglik,
        torch.tensor([0, 0, 1]),
        2,
        torch.tensor([0.5, 0.5]),
        record_mask=torch.tensor([True, False, True]),
    )
    assert torch.allclose(gamma[0], torch.tensor([2 / 3, 1 / 3]), atol=1e-6)


def test_e_step_is_stable_in_log_space():
    """Hundreds of records per annotator: products of probabilities underflow, the log-space E-step does not."""
    loglik = torch.stack([torch.full((400,), -3.0), torch.full((400,), -3.1)], -1)
    gamma, _, total = em_dpo.e_step(loglik, torch.zeros(400, dtype=torch.long), 1, torch.tensor([0.5, 0.5]))
    assert torch.isfinite(gamma).all() and math.isfinite(total)
    assert gamma[0, 0] == pytest.approx(1 / (1 + math.exp(-40)), rel=1e-6)  # odds e^{400·0.1}
    assert em_dpo.gamma_entropy(torch.tensor([[0.5, 0.5]])) == pytest.approx(math.log(2))


def _pl_sample(rng, rewards, n_ranked):
    remaining, order = list(range(len(rewards))), []
    for _ in range(n_ranked):
        w = np.exp(rewards[remaining] - rewards[remaining].max())
        order.append(remaining.pop(rng.choice(len(remaining), p=w / w.sum())))
    return order


def test_exact_em_never_decreases_the_log_likelihood():
    """Tabular Plackett–Luce mixture (6 items, rewards θ_k per item, K = 2): the M-step maximizes the γ-weighted
    PL log-likelihood to convergence (it is concave in θ_k), so each EM iteration must not decrease the
    observed log-likelihood Σ_u log Σ_k η_k Π_j P_k(j). Mixed data: pairs, full 3-rankings and top-1 of 3."""
    rng = np.random.default_rng(0)
    true_theta = np.array([[2.0, 1, 0, -1, -2, 0], [-2.0, -1, 0, 1, 2, 0]])
    items, rankings, index, sizes = [], [], [], []
    for u in range(30):
        for _ in range(4):
            n = int(rng.choice([2, 3]))
            chosen = rng.choice(6, size=n, replace=False)
            m = n if n == 2 else int(rng.choice([1, 3]))
            items.append(list(chosen) + [0] * (3 - n))
            rankings.append(_pl_sample(rng, true_theta[u % 2][chosen], m) + [-1] * (3 - m))
            index.append(u)
            sizes.append(n)
    items, rankings, index = torch.tensor(items), torch.tensor(rankings), torch.tensor(index)
    present = torch.arange(3)[None] < torch.tensor(sizes)[:, None]  # pairs have a padding column
    theta = torch.tensor(rng.normal(0, 0.1, size=(2, 6)), dtype=torch.float64)
    gamma = torch.tensor(rng.dirichlet([1, 1], size=30))
    eta = gamma.mean(0)
    previous = -math.inf
    for _ in range(8):
        for k in range(2):  # exact M-step
            param = theta[k].clone().requires_grad_(True)
            opt = torch.optim.LBFGS(
                [param],
                max_iter=500,
                tolerance_grad=1e-10,
                tolerance_change=1e-12,
                line_search_fn="strong_wolfe",
            )

            def closure(k=k, param=param, opt=opt, gamma=gamma):
                opt.zero_grad()
                loss = -(gamma[index, k] * ranking_log_likelihood(param[items], rankings, present)).sum()
                loss.backward()
                return loss

            opt.step(closure)
            theta[k] = param.detach()
        loglik = torch.stack(
            [ranking_log_likelihood(theta[k][items], rankings, present) for k in range(2)], -1
        )
        gamma, eta, total = em_dpo.e_step(loglik, index, 30, eta)
        assert total >= previous - 1e-7
        previous = total
    truth = np.array([u % 2 for u in range(30)])
    assert (
        em_dpo.adjusted_rand(
            {str(u): truth[u] for u in range(30)}, [str(u) for u in range(30)], gamma.numpy()
        )
        > 0.5
    )


def _rec(prompt, responses, ranking, annotator):
    return PreferenceRecord(prompt, responses, ranking, annotator)


def test_bad_input_is_named():
    records = [_rec("p", ["a", "b"], [0, 1], "u1"), _rec("p", ["a", "b"], [1, 0], None)]
    with pytest.raises(DataError, match=r"record 1: field 'annotator'"):
        em_dpo.annotator_index(records)
    cfg = em_dpo.Config(em=em_dpo.EMConfig(n_types=3))
    with pytest.raises(ConfigError, match=r"em.n_types' = 3 exceeds the number of annotators \(2\)"):
        em_dpo.run_em(
            cfg, [_rec("p", ["a", "b"], [0, 1], "u1"), _rec("p", ["a", "b"], [1, 0], "u2")], None, None
        )
    with pytest.raises(ConfigError, match="init_labels"):
        em_dpo.EMConfig(init="labels").validate()


def test_holdout_halves_alternate_and_single_record_annotators_use_both():
    """Documented behaviour: an annotator with one record is trained and scored on it every iteration."""
    halves = em_dpo.record_halves(torch.tensor([0, 1, 0, 0, 2, 1]))
    assert halves.tolist() == [0, 0, 1, 0, -1, 1]


def test_labels_init_and_kmeans_on_preference_directions():
    """Annotators who like "great" vs "awful" point in opposite bag-of-words directions: k-means splits them."""
    records, truth = [], {}
    rng = np.random.default_rng(0)
    for u in range(12):
        truth[f"u{u}"] = u % 2
        for _ in range(2):
            ys = ["the food was great .", "the food was awful .", "the room was okay ."]
            rng.shuffle(ys)
            best = ys.index("the food was great ." if u % 2 == 0 else "the food was awful .")
            records.append(_rec("review: x", ys, [best], f"u{u}"))
    names, index = em_dpo.annotator_index(records)
    em = em_dpo.EMConfig(n_types=2, init="kmeans", init_smoothing=0.1)
    gamma = em_dpo.initial_gamma(em, records, index, names, seed=0)
    assert np.allclose(gamma.sum(1), 1) and set(np.round(gamma.max(1), 6)) == {0.95}
    assert em_dpo.adjusted_rand(truth, names, gamma) == pytest.approx(1.0)
    em = em_dpo.EMConfig(n_types=2, init="labels", init_labels="unused.json", init_smoothing=0.0)
    gamma = em_dpo.initial_gamma(em, records, index, names, 0, labels=truth)
    assert np.array_equal(gamma.argmax(1), [truth[u] for u in names])
    with pytest.raises(ConfigError, match="no label for annotator"):
        em_dpo.initial_gamma(em, records, index, names, 0, labels={"u0": 0})


def _opposite_bag_of_words_records(seed, n_annotators=60, per_annotator=6, temperature=0.5):
    """Ternary records over responses of 1-11 filler words plus 0-2 of "great"/"awful"; annotator u ranks by
    Plackett-Luce on ±(#great − #awful) / temperature (sign by u % 2)."""
    rng = np.random.default_rng(seed)
    filler = [f"w{i}" for i in range(40)]
    records, truth = [], {}
    for u in range(n_annotators):
        truth[f"u{u}"] = u % 2
        for _ in range(per_annotator):
            ys, scores = [], []
            for _ in range(3):
                words = list(rng.choice(filler, size=rng.integers(1, 12)))
                score = 0
                for _ in range(rng.integers(0, 3)):
                    word = str(rng.choice(["great", "awful"]))
                    score += 1 if word == "great" else -1
                    words.insert(int(rng.integers(0, len(words) + 1)), word)
                ys.append(" ".join(words))
                scores.append(score if u % 2 == 0 else -score)
            order = _pl_sample(rng, np.array(scores, float) / temperature, 3)
            records.append(_rec("review:", ys, order, f"u{u}"))
    return records, truth


def test_whitened_init_separates_opposite_annotators():
    """Opposite bag-of-words preferences hidden among 40 filler words (6 ternary records per annotator):
    k-means on the noise-whitened directions recovers the two groups (ARI ≥ 0.9 on 3 data seeds; measured 1.0).
    The whitening projects on K − 1 = 1 direction, so features are [U, 1] and centred."""
    for seed in range(3):
        records, truth = _opposite_bag_of_words_records(seed)
        names, index = em_dpo.annotator_index(records)
        features = em_dpo.whitened_directions(records, index, len(names), 1, seed=0)
        assert features.shape == (len(names), 1) and abs(features.mean()) < 1e-9
        em = em_dpo.EMConfig(n_types=2, init="whitened")
        gamma = em_dpo.initial_gamma(em, records, index, names, seed=0)
        assert em_dpo.adjusted_rand(truth, names, gamma) >= 0.9


def test_demo_em_config_names_the_reference_it_trains_from():
    """A quick demo run must save world:reviews-quick, or `prefalign aggregate` rebuilds the wrong reference."""
    from prefalign.demos.em_dpo import em_config

    assert em_config("x", 2, 1, 0, quick=True).model.name_or_path == "world:reviews-quick"
    assert em_config("x", 2, 1, 0, quick=False).model.name_or_path == "world:reviews"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    base = build_model(ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0)
    torch.manual_seed(0)
    model, adapters = em_dpo.add_type_adapters(base, LoraSettings(r=4, alpha=8), 2)
    return model, tokenizer, adapters


def test_weighted_m_step_is_the_gamma_weighted_sum_and_trains_only_weighted_adapters(tiny):
    """The step's loss = Σ_b Σ_k w_bk ℓ_bk / Σ_b Σ_k w_bk with ℓ_bk the listwise DPO loss of adapter k; with
    one-hot weights (stochastic EM) a type absent from the batch gets no gradient."""
    model, tokenizer, adapters = tiny
    records = [
        _rec(
            "review: the pizza place", ["the food was great .", "the food was awful .", "the bill ."], r, "u"
        )
        for r in ([0, 1, 2], [2], [1, 0, 2])
    ]
    encoded = encode_records(tokenizer, records, max_length=32, max_prompt_length=8)
    for e in encoded:
        e.reference_logps = [-5.0, -6.0, -4.0]
    weights = [np.array([0.7, 0.3]), np.array([0.2, 0.8]), np.array([1.0, 0.0])]
    model.eval()  # no dropout: both computations must see the same network
    batch = em_dpo.make_collate(tokenizer.pad_token_id)(list(zip(encoded, weights)))
    loss, metrics = em_dpo.make_step(adapters, beta=0.5)(model, batch)
    want = 0.0
    with torch.no_grad():
        for k, name in enumerate(adapters):
            em_dpo.activate(model, name)
            from prefalign.core.logprobs import collate, sequence_logps

            full = collate(encoded, tokenizer.pad_token_id)
            losses, _ = plackett_luce_loss(
                sequence_logps(model, full)[0], full["reference_logps"], full["ranking"], 0.5
            )
            want += sum(w[k] * losses[b] for b, w in enumerate(weights))
    assert float(loss.detach()) == pytest.approx(float(want) / 3, rel=1e-5)
    model.zero_grad()
    one_hot = [np.array([1.0, 0.0])] * 3
    loss, _ = em_dpo.make_step(adapters, 0.5)(
        model, em_dpo.make_collate(tokenizer.pad_token_id)(list(zip(encoded, one_hot)))
    )
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}  # A has no grad while B = 0
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "type0" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "type1" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_first_m_step_trains_every_adapter():
    """Regression: peft's disable_adapter() (the reference pass) leaves only the active adapter trainable and
    fit() optimizes what requires grad when it starts, so type1 used to stay exactly at the reference for the
    whole first M-step. After one iteration every adapter's LoRA B must have moved from 0."""
    tokenizer = build_tokenizer()
    base = build_model(ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0)
    ys = ["the food was great .", "the food was awful .", "the bill was okay ."]
    records = [_rec("review: the pizza place", ys, [u % 3, (u + 1) % 3], f"u{u}") for u in range(8)]
    cfg = em_dpo.Config(
        em=em_dpo.EMConfig(n_types=2, max_iterations=1, init="labels", init_labels="-"),
        train=TrainConfig(output_dir="", max_steps=2, batch_size=8, learning_rate=1e-2, progress=False),
    )
    cfg.model.lora = LoraSettings(enabled=True, r=2, alpha=4)
    labels = {f"u{u}": u % 2 for u in range(8)}
    result = em_dpo.run_em(cfg, records, base, tokenizer, init_labels=labels)
    for name in result.adapters:
        moved = sum(float(p.abs().sum()) for n, p in result.model.named_parameters() if f"lora_B.{name}" in n)
        assert moved > 0, f"adapter {name} was never trained"


def test_e_step_scores_only_the_held_out_half(tiny):
    """type_rewards with a record mask fills the masked records and leaves the others at 0 (never scored)."""
    model, tokenizer, adapters = tiny
    records = [_rec("review: x", ["the food was great .", "the bill ."], [0, 1], "u") for _ in range(3)]
    encoded = encode_records(tokenizer, records, max_length=32, max_prompt_length=8)
    for e in encoded:
        e.reference_logps = [-5.0, -6.0]
    full = em_dpo.type_rewards(model, encoded, adapters, 0.5, tokenizer.pad_token_id, 8)
    half = em_dpo.type_rewards(
        model, encoded, adapters, 0.5, tokenizer.pad_token_id, 8, torch.tensor([True, False, True])
    )
    assert torch.allclose(half[[0, 2]], full[[0, 2]], atol=1e-5) and (half[1] == 0).all()
    assert (full[1] != 0).all()


def test_full_copies_train_every_type_keep_the_reference_and_round_trip(tmp_path):
    """em.adapter: full keeps one full copy per type: after one iteration every copy has moved, the reference
    (disable_adapter) is still exactly the base, and save_result/load_adapters rebuild the same type policies."""
    import copy

    tokenizer = build_tokenizer()
    base = build_model(ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0)
    original = copy.deepcopy(base).eval()
    ys = ["the food was great .", "the food was awful .", "the bill was okay ."]
    records = [_rec("review: the pizza place", ys, [u % 3, (u + 1) % 3], f"u{u}") for u in range(8)]
    cfg = em_dpo.Config(
        em=em_dpo.EMConfig(n_types=2, max_iterations=1, init="labels", init_labels="-", adapter="full"),
        train=TrainConfig(output_dir="", max_steps=2, batch_size=8, learning_rate=1e-2, progress=False),
    )
    labels = {f"u{u}": u % 2 for u in range(8)}
    result = em_dpo.run_em(cfg, records, base, tokenizer, init_labels=labels)
    model, ids = (
        result.model,
        tokenizer(["review: the pizza place the food was great ."], return_tensors="pt"),
    )
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(**ids).logits, original(**ids).logits)
    for name in result.adapters:
        moved = sum(
            float((p - q).abs().sum()) for p, q in zip(model.copies[name].parameters(), original.parameters())
        )
        assert moved > 0, f"type copy {name} was never trained"
    em_dpo.save_result(tmp_path, result, records)
    loaded = em_dpo.load_adapters(copy.deepcopy(original), tmp_path / "adapters", result.adapters).eval()
    with torch.no_grad():
        for name in result.adapters:
            model.set_adapter(name)
            loaded.set_adapter(name)
            assert torch.allclose(model(**ids).logits, loaded(**ids).logits, atol=1e-6)
    with pytest.raises(ConfigError, match="em.adapter"):
        em_dpo.type_policies(original, em_dpo.EMConfig(adapter="qlora"), LoraSettings())


@pytest.mark.slow
def test_em_from_an_uninformed_start_recovers_opposite_types_at_scale():
    """Reviews world, enthusiast vs critic 50/50, 200 annotators x 8 ternary rankings (T = 0.25; oracle ARI ~1).
    From the `whitened` start (no labels), EM-DPO with full type copies and holdout scoring groups the
    annotators by type (measured ARI 0.81 -> 0.86 over 4 iterations) and the two type policies move in
    opposite directions on the true enthusiast reward (measured +0.61 / -0.57; the reference is ~0.09)."""
    import copy

    from prefalign.core.models import LoraSettings
    from prefalign.methods.em_dpo.aggregate import cross_evaluation
    from prefalign.worlds.reviews import TYPES, ReviewsWorld

    world = ReviewsWorld(seed=0, quick=True)
    base, tokenizer = world.reference()
    n_annotators, per_annotator = 200, 8
    prompts = world.train_prompts * (n_annotators * per_annotator // len(world.train_prompts) + 1)
    records, truth = world.preference_data(
        prompts[: n_annotators * per_annotator],
        {"enthusiast": 0.5, "critic": 0.5},
        n_responses=3,
        records_per_annotator=per_annotator,
        temperature=0.25,
        seed=0,
    )
    cfg = em_dpo.Config(
        em=em_dpo.EMConfig(n_types=2, max_iterations=3, init="whitened", adapter="full", holdout=True),
        loss=em_dpo.LossConfig(beta=0.1),
        train=TrainConfig(
            output_dir="", epochs=3.0, batch_size=16, learning_rate=3e-3, warmup_steps=5, progress=False
        ),
    )
    cfg.model.lora = LoraSettings(enabled=True, r=8, alpha=16)
    cfg.data.max_length, cfg.data.max_prompt_length = 64, 16
    result = em_dpo.run_em(cfg, records, copy.deepcopy(base), tokenizer, true_types=truth)
    assert result.history[-1]["em/ari"] > 0.6
    policy_reward, _ = cross_evaluation(
        result.model,
        tokenizer,
        world.eval_prompts * 2,
        result.adapters,
        reward_fns=[lambda prompt, response: TYPES["enthusiast"](response)],
        n_samples=4,
        seed=1,
    )
    low, high = sorted(np.asarray(policy_reward[0], dtype=float))
    assert high > 0.3 and low < -0.2


# ---------------------------------------------------------------- cross-fitting, restarts, plateau


def test_cross_fit_items_by_hand():
    """F = 2, K = 2: a record of a fold-0 annotator with type weights (0.3, 0.7) trains only fold 1's policies:
    weights (0, 0, 0.3, 0.7); a fold-1 record (1, 0) -> (1, 0, 0, 0)."""
    items = [("r0", np.array([0.3, 0.7])), ("r1", np.array([1.0, 0.0]))]
    out = em_dpo.cross_fit_items(items, torch.tensor([0, 1]), 2)
    assert [r for r, _ in out] == ["r0", "r1"]
    assert np.allclose(out[0][1], [0, 0, 0.3, 0.7]) and np.allclose(out[1][1], [1, 0, 0, 0])


def test_annotator_folds_are_balanced_and_seeded():
    folds = em_dpo.annotator_folds(11, 3, seed=0)
    assert sorted(np.bincount(folds.numpy()).tolist()) == [3, 4, 4]
    assert torch.equal(folds, em_dpo.annotator_folds(11, 3, seed=0))
    assert not torch.equal(folds, em_dpo.annotator_folds(11, 3, seed=1))


def _tiny_run(records, labels=None, tmp=None, **em_kwargs):
    tokenizer = build_tokenizer()
    base = build_model(ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0)
    em = {"n_types": 2, "max_iterations": 1, "init": "labels" if labels else "dirichlet", "init_labels": "-",
          "adapter": "full", "tolerance": None, **em_kwargs}  # fmt: skip
    cfg = em_dpo.Config(
        em=em_dpo.EMConfig(**em),
        train=TrainConfig(
            output_dir="", max_steps=3, batch_size=4, learning_rate=1e-2, progress=False, max_grad_norm=0.0
        ),  # fmt: skip
    )
    return em_dpo.run_em(cfg, records, base, tokenizer, init_labels=labels, run_dir=tmp)


YS = ["the food was great .", "the food was awful .", "the bill was okay ."]


def test_cross_fitted_policies_never_see_the_annotators_they_score():
    """Cross-fitting, 2 folds: fold f's policies train only on the other fold's annotators. Reversing every
    ranking of fold 0's annotators therefore leaves fold 0's policies bit-identical (gradient clipping off, the
    only coupling between policies) and changes fold 1's."""
    records = [
        _rec("review: the pizza place", YS, [u % 3, (u + 1) % 3, (u + 2) % 3], f"u{u}") for u in range(8)
    ]
    labels = {f"u{u}": u % 2 for u in range(8)}
    fold = em_dpo.annotator_folds(8, 2, seed=0)
    flipped = [_rec(r.prompt, r.responses, r.ranking[::-1], r.annotator) if fold[u] == 0 else r
               for u, r in enumerate(records)]  # fmt: skip
    a = _tiny_run(records, labels, folds=2)
    b = _tiny_run(flipped, labels, folds=2)
    assert a.adapters == ["type0", "type1"]
    for k in range(2):
        for p, q in zip(
            a.model.copies[f"fold0_type{k}"].parameters(), b.model.copies[f"fold0_type{k}"].parameters()
        ):
            assert torch.equal(p, q)
    moved = sum(float((p - q).abs().sum()) for p, q in
                zip(a.model.copies["fold1_type0"].parameters(), b.model.copies["fold1_type0"].parameters()))  # fmt: skip
    assert moved > 0
    assert a.history[-1]["em/log_likelihood_kind"] == "held-out"


def test_plateau_stops_em_and_holdout_compares_the_same_half():
    """With a huge tolerance every iteration after the first is a plateau: EM stops after 2 iterations; with
    em.holdout the log-likelihoods of alternate halves are not comparable, so it compares iterations two apart
    and stops after 3; tolerance null runs em.max_iterations."""
    records = [_rec("review: the pizza place", YS, [u % 3, (u + 1) % 3], f"u{u // 2}") for u in range(12)]
    assert len(_tiny_run(records, max_iterations=5, tolerance=1e9).history) == 2
    assert _tiny_run(records, max_iterations=5, tolerance=1e9).history[-1]["em/plateau"]
    assert len(_tiny_run(records, max_iterations=5, tolerance=1e9, holdout=True).history) == 3
    assert len(_tiny_run(records, max_iterations=3, tolerance=None).history) == 3


def test_restarts_keep_the_best_and_resume_without_training(tmp_path):
    """em.restarts = 3 from Dirichlet starts: the result is the restart with the highest final log-likelihood,
    its weights are the ones saved for that restart, and a rerun on the finished run directory trains nothing
    and returns the same."""
    from safetensors.torch import load_file

    records = [_rec("review: the pizza place", YS, [u % 3, (u + 1) % 3], f"u{u // 2}") for u in range(12)]
    result = _tiny_run(records, tmp=tmp_path, restarts=3, dirichlet_alpha=0.3)
    best = int(np.argmax(result.restarts))
    assert best != 2, "the best restart must not be the last one, or bringing it back is not tested"
    assert (
        result.history[-1]["em/log_likelihood"] == max(result.restarts)
        and result.history[-1]["restart"] == best
    )
    root = tmp_path / "em" / (f"restart-{best}" if best else "")
    saved = load_file(root / "iter-1" / "trainable.safetensors")
    params = dict(result.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    again = _tiny_run(records, tmp=tmp_path, restarts=3, dirichlet_alpha=0.3)
    assert again.restarts == result.restarts and np.allclose(again.gamma, result.gamma)
    params_again = dict(again.model.named_parameters())
    assert all(torch.equal(params_again[n], t) for n, t in saved.items())


def test_reset_and_copy_policies():
    """reset_types puts a trained policy back to the reference (LoRA: B = 0; full copy: the base's weights);
    copy_type makes one policy compute exactly what another does."""
    tokenizer = build_tokenizer()
    ids = tokenizer(["review: the pizza place the food was great ."], return_tensors="pt")
    for adapter in ("lora", "full"):
        base = build_model(
            ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0
        ).eval()
        with torch.no_grad():
            want = base(**ids).logits.clone()
        model, names = em_dpo.type_policies(
            base, em_dpo.EMConfig(adapter=adapter), LoraSettings(r=2, alpha=4)
        )
        model.eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and ("type1" in n or adapter == "lora"):
                    p.add_(0.5 * torch.randn_like(p))

        def logits(name, model=model):
            model.set_adapter(name)
            with torch.no_grad():
                return model(**ids).logits

        assert not torch.allclose(logits("type1"), want)
        em_dpo.copy_type(model, "type1", "type0")
        assert torch.allclose(logits("type0"), logits("type1"), atol=1e-6)
        em_dpo.reset_types(model, names, seed=3)
        assert torch.allclose(logits("type0"), want, atol=1e-6) and torch.allclose(
            logits("type1"), want, atol=1e-6
        )


def test_em_config_errors_are_named():
    with pytest.raises(ConfigError, match="choose one"):
        em_dpo.EMConfig(folds=2, holdout=True).validate()
    with pytest.raises(ConfigError, match="em.restarts"):
        em_dpo.EMConfig(restarts=0).validate()
    with pytest.raises(ConfigError, match="em.tolerance"):
        em_dpo.EMConfig(tolerance=-1.0).validate()
    with pytest.raises(ConfigError, match=r"em.folds' = 3 exceeds the number of annotators \(2\)"):
        _tiny_run([_rec("p", ["a", "b"], [0, 1], "u1"), _rec("p", ["a", "b"], [1, 0], "u2")], folds=3)


def test_cross_fitted_run_directory_holds_the_final_types_and_reloads(tmp_path):
    """A cross-fitted EM-DPO run through the runner (reviews world's quick reference, full copies): the run
    directory holds γ for every annotator, η and adapters for type0/type1 only (the fold policies are
    scaffolding), metrics.jsonl logs the held-out and in-sample log-likelihoods and the final M-step, and
    `load_run` rebuilds type policies that compute what the trained ones did."""
    import json

    from prefalign import runner
    from prefalign.worlds.reviews import ReviewsWorld

    world = ReviewsWorld(seed=0, quick=True)
    base, tokenizer = world.reference()
    records, truth = world.preference_data(
        world.train_prompts[:24], {"enthusiast": 0.5, "critic": 0.5}, n_responses=3, records_per_annotator=2,
        temperature=0.25,
    )  # fmt: skip
    cfg = em_dpo.Config(
        em=em_dpo.EMConfig(
            n_types=2,
            max_iterations=2,
            init="dirichlet",
            adapter="full",
            folds=2,
            in_sample_loglik=True,
            tolerance=None,
        ),  # fmt: skip
        train=TrainConfig(
            output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, learning_rate=3e-3, progress=False
        ),  # fmt: skip
    )
    cfg.data.max_length, cfg.data.max_prompt_length = 64, 16
    cfg.model.name_or_path = "world:reviews-quick"  # what load_run rebuilds the reference from
    res = runner.run(cfg, records=records, model=base, tokenizer=tokenizer, true_types=truth)
    final = res.run_dir / "final"
    assert (final / "gamma.csv").read_text().count("\n") == len(truth) + 1
    assert sorted(json.loads((final / "eta.json").read_text())) == ["type0", "type1"]
    assert sorted(p.name for p in (final / "adapters").iterdir()) == ["type0", "type1"]
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("iteration") for x in lines] == [1, 2, None]  # two iterations, then the final M-step
    assert all(
        x["em/log_likelihood_kind"] == "held-out" and "em/log_likelihood_in_sample" in x for x in lines[:2]
    )
    assert "em/final_fit_loss" in lines[-1]
    _, model, tok, adapters = em_dpo.load_run(res.run_dir)
    ids = tok(["review: the pizza place the food was great ."], return_tensors="pt")
    trained = res.model.eval()
    with torch.no_grad():
        for name in adapters:
            trained.set_adapter(name)
            model.set_adapter(name)
            assert torch.allclose(trained(**ids).logits, model(**ids).logits, atol=1e-5)
