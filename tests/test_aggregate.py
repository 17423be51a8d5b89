"""Min-max-regret aggregation: regret matrix, game solvers (OMW vs exact LP), MixturePolicy."""

import itertools

import numpy as np
import pytest
import torch

from prefalign.core.logprobs import generate_responses
from prefalign.core.models import LoraSettings
from prefalign.methods.em_dpo.aggregate import (
    MixturePolicy,
    cross_evaluation,
    min_max_regret,
    regret_matrix,
    solve_lp,
    solve_omw,
)
from prefalign.methods.em_dpo.em import add_type_adapters
from prefalign.worlds.reviews import ReferenceConfig, build_model, build_tokenizer

torch.set_num_threads(1)


def test_regret_matrix_by_hand():
    """R[i, j] = c_i (max_j' L[i, j'] − L[i, j]): L = [[3, 1], [0, 2]], c = (1, 2) -> R = [[0, 2], [4, 0]].
    Types and policies need not be as many: L = [[3, 1, 2], [0, 2, 1]] (2 types, 3 policies) -> best (3, 2),
    R = [[0, 2, 1], [2, 0, 1]]."""
    R = regret_matrix([[3.0, 1.0], [0.0, 2.0]], type_weights=[1.0, 2.0])
    assert np.allclose(R, [[0, 2], [4, 0]])
    assert np.allclose(regret_matrix([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]]), [[0, 2, 1], [2, 0, 1]])
    with pytest.raises(ValueError, match="2-D"):
        regret_matrix(np.zeros(3))
    with pytest.raises(ValueError, match="type_weights"):
        regret_matrix(np.zeros((2, 2)), type_weights=[1.0, -1.0])


def test_regret_is_against_the_best_available_policy_not_the_diagonal():
    """EM's policies come in no particular order. L = [[0, 2], [2, 0]] (type 0's best policy sits in column 1):
    the old diagonal rule gave R = [[0, −2], [−2, 0]] and a "max regret" of −2 at w = (½, ½); the best
    available rule gives R = [[2, 0], [0, 2]], whose game value is 1 at w = (½, ½). With an explicit matching
    (type 0 -> policy 1, type 1 -> policy 0) the same R; a wrong matching is a negative regret: an error."""
    L = [[0.0, 2.0], [2.0, 0.0]]
    assert np.allclose(regret_matrix(L), [[2, 0], [0, 2]])
    assert np.allclose(regret_matrix(L, matching=[1, 0]), [[2, 0], [0, 2]])
    with pytest.raises(ValueError, match="negative regret"):
        regret_matrix(L, matching=[0, 1])
    with pytest.raises(ValueError, match="matching"):
        regret_matrix(L, matching=[0, 2])
    out = min_max_regret(L)
    assert out["max_regret"] == pytest.approx(1.0, abs=1e-3) and min(out["regrets"]) >= 0


def test_weights_and_max_regret_do_not_depend_on_the_order_of_policies():
    """Three type policies in all 6 column orders (the order EM happens to produce): the weights, mapped back to
    the policies, and the max regret are the same in every order (optimistic Hedge is symmetric in the columns
    and the LP value is a property of the game), and no regret is negative. A non-degenerate L: its LP optimum
    is unique, so the LP weights agree too."""
    rng = np.random.default_rng(4)
    L = rng.normal(size=(3, 3)) + 2 * np.eye(3)
    reference = min_max_regret(L)
    ref_w = np.asarray(reference["weights"])
    for perm in itertools.permutations(range(3)):
        out = min_max_regret(L[:, list(perm)])
        back = np.empty(3)
        back[list(perm)] = out["weights"]
        assert np.allclose(back, ref_w, atol=1e-9), perm
        assert out["max_regret"] == pytest.approx(reference["max_regret"], abs=1e-9)
        assert out["lp_max_regret"] == pytest.approx(reference["lp_max_regret"], abs=1e-9)
        lp_back = np.empty(3)
        lp_back[list(perm)] = out["lp_weights"]
        assert np.allclose(lp_back, reference["lp_weights"], atol=1e-7)
        assert min(out["regrets"]) >= 0 and np.min(out["regret_matrix"]) >= 0


def test_opposite_types_split_evenly_and_weights_shift_it():
    """Two opposite types: L = [[1, −1], [−1, 1]] -> R = [[0, 2], [2, 0]]; max(2 w_2, 2 w_1) is minimized
    at w = (½, ½) with value 1. With type weights c = (1, 3): R = [[0, 2], [6, 0]]; equalizing
    2 w_2 = 6 w_1 with w_1 + w_2 = 1 gives w = (¼, ¾), value 1.5."""
    L = [[1.0, -1.0], [-1.0, 1.0]]
    out = min_max_regret(L)
    assert np.allclose(out["weights"], [0.5, 0.5], atol=1e-3)
    assert out["max_regret"] == pytest.approx(1.0, abs=1e-3)
    out = min_max_regret(L, type_weights=[1.0, 3.0])
    assert np.allclose(out["weights"], [0.25, 0.75], atol=2e-3)
    assert out["max_regret"] == pytest.approx(1.5, abs=5e-3)
    assert out["lp_max_regret"] == pytest.approx(1.5, abs=1e-9)


def test_dominant_policy_gets_all_the_weight():
    """Policy 2 is every type's second best by a hair: it beats any split between the specialists."""
    L = np.array([[1.0, 0.0, 0.95], [0.0, 1.0, 0.95], [0.5, 0.5, 1.0]])
    out = min_max_regret(L, solver="lp")
    assert np.allclose(out["weights"], [0, 0, 1], atol=1e-6)
    assert out["max_regret"] == pytest.approx(0.05, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_optimistic_hedge_matches_the_exact_lp(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 6))
    R = regret_matrix(rng.normal(size=(K, K)) * rng.uniform(0.1, 10))
    lp_weights, lp_value = solve_lp(R)
    w = solve_omw(R, iterations=20_000)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert (R @ w).max() == pytest.approx(lp_value, abs=2e-3 * np.abs(R).max())
    # the LP value is the true optimum: no mixture on a grid of random points beats it
    random_w = rng.dirichlet(np.ones(K), size=2000)
    assert (random_w @ R.T).max(1).min() >= lp_value - 1e-9


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    base = build_model(ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0)
    torch.manual_seed(0)  # LoRA A matrices are drawn from the global RNG
    model, adapters = add_type_adapters(base, LoraSettings(r=4, alpha=8), 2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # type0 stays equal to the reference (LoRA B = 0); type1 moves far from it
        for name, p in model.named_parameters():
            if "lora_B" in name and "type1" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 2.0)
    return model, tokenizer, adapters


PROMPTS = ["review: the pizza place", "review: the sushi bar", "review: the taco truck"]


def test_mixture_with_all_weight_on_one_adapter_is_that_adapter(tiny):
    model, tokenizer, adapters = tiny
    mixture = MixturePolicy(model, tokenizer, adapters, [0.0, 1.0])
    got = mixture.generate(PROMPTS, n_per_prompt=2, seed=3, max_new_tokens=8)
    model.set_adapter("type1")
    jobs = [p for p in PROMPTS for _ in range(2)]  # the mixture draws each (prompt, sample) job on its own
    want = generate_responses(model, tokenizer, jobs, max_new_tokens=8, seed=3 + 1 + 1)  # seed + 1 + adapter
    assert got == [[want[2 * i][0], want[2 * i + 1][0]] for i in range(len(PROMPTS))]
    with pytest.raises(ValueError, match="probability vector"):
        MixturePolicy(model, tokenizer, adapters, [0.5, 0.6])


def test_mixture_save_load_round_trip(tiny, tmp_path):
    model, tokenizer, adapters = tiny
    mixture = MixturePolicy(model, tokenizer, adapters, [0.3, 0.7])
    before = mixture.generate(PROMPTS, n_per_prompt=3, seed=1, max_new_tokens=8)
    mixture.save(tmp_path / "mix")
    base = build_model(ReferenceConfig(n_layer=1, n_head=2, n_embd=32, n_positions=48), tokenizer, 0)
    loaded = MixturePolicy.load(tmp_path / "mix", base_model=base)
    assert loaded.adapters == adapters and np.allclose(loaded.weights, [0.3, 0.7])
    assert loaded.generate(PROMPTS, n_per_prompt=3, seed=1, max_new_tokens=8) == before


def test_implicit_cross_evaluation_diagonal_is_a_kl(tiny):
    """Type0 equals the reference, so its implicit reward is 0 on every sample: row 0 of L is 0. For type1,
    L[1, 1] − L[1, 0] = β·(E_{π_1} − E_{π_ref})[log π_1 − log π_ref] = β·(KL(π_1‖π_ref) + KL(π_ref‖π_1)) > 0
    (up to sampling noise and the EOS appended to truncated samples). A ground-truth reward (response length)
    gives the same row for every type."""
    model, tokenizer, adapters = tiny
    L, samples = cross_evaluation(
        model, tokenizer, PROMPTS * 4, adapters, beta=0.5, n_samples=8, max_new_tokens=10
    )
    assert L.shape == (2, 2) and np.allclose(L[0], 0, atol=1e-5) and L[1, 1] - L[1, 0] > 0.05
    length = lambda x, y: float(len(y.split()))  # noqa: E731
    G, _ = cross_evaluation(
        model, tokenizer, PROMPTS * 4, adapters, reward_fns=[length, length], n_samples=8, max_new_tokens=10
    )
    assert np.allclose(G[0], G[1]) and G[0, 0] == pytest.approx(
        np.mean([len(y.split()) for ys in samples[0] for y in ys])
    )
