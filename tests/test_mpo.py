"""MPO (reconstruction, see docs/mpo.md): loss values by hand, gradient shape, and the recipe's contracts."""

import json
import math
import os
import weakref

import pytest
import torch

from prefalign import runner
from prefalign.core import reference
from prefalign.core.config import ConfigError, build
from prefalign.core.data import PreferenceRecord
from prefalign.core.logprobs import collate, encode_records, sequence_logps
from prefalign.losses import dpo_loss, mpo_listwise_loss, mpo_loss, regularization_nll
from prefalign.methods import dpo as dpo_recipe
from prefalign.methods import mpo

SIGMOID_2 = 1 / (1 + math.exp(-2))  # σ(2) = 0.8807970779...


def t(*values):
    return torch.tensor([float(v) for v in values])


# ---------------------------------------------------------------- loss values


def test_mpo_hand_values():
    """log π(y_w) = −1, log π(y_l) = −3 → h = 2.
    β = 1: L = −σ(2) = −0.880797; β = 0.5: L = −σ(1) = −0.731059; equal log-probs: L = −σ(0) = −1/2.
    The returned winner weight is −L (the importance weight π_w/(π_w + π_l) at β = 1: e^−1/(e^−1 + e^−3))."""
    losses, weights = mpo_loss(t(-1, -2), t(-3, -2), beta=1.0)
    torch.testing.assert_close(losses, t(-SIGMOID_2, -0.5))
    torch.testing.assert_close(weights, -losses)
    assert weights[0].item() == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-3)))
    assert mpo_loss(t(-1), t(-3), beta=0.5)[0].item() == pytest.approx(-0.7310585786)


def test_mpo_gradient_hand_value():
    """dL/d log π(y_w) = −β·σ(βh)(1 − σ(βh)) and dL/d log π(y_l) = +β·σ(βh)(1 − σ(βh)).
    h = 0, β = 1: ∓1/4. h = 2, β = 0.5: σ(1)(1 − σ(1)) = 0.196612 → ∓0.098306."""
    for h, beta, expected in [(0.0, 1.0, 0.25), (2.0, 0.5, 0.5 * 0.7310585786 * (1 - 0.7310585786))]:
        chosen, rejected = t(h - 1).requires_grad_(), t(-1).requires_grad_()
        mpo_loss(chosen, rejected, beta=beta)[0].sum().backward()
        assert chosen.grad.item() == pytest.approx(-expected)
        assert rejected.grad.item() == pytest.approx(expected)


def margin_gradients(h_values, mpo_beta, dpo_beta):
    """|dL/dh| of MPO (margin h of the policy's log-probs) and DPO (reference log-probs 0, so the same h)."""
    h = torch.tensor(h_values, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros_like(h)
    (mpo_grad,) = torch.autograd.grad(mpo_loss(h, zero, beta=mpo_beta)[0].sum(), h)
    (dpo_grad,) = torch.autograd.grad(dpo_loss(h, zero, zero, zero, beta=dpo_beta)[0].sum(), h)
    return mpo_grad.abs(), dpo_grad.abs()


def test_gradient_vanishes_as_the_pair_separates_while_dpos_does_not():
    """At the defaults (MPO β = 1 on log π, DPO β = 0.1 on the log-ratio margin), as the pair separates to
    h = 30 nats: MPO's |dL/dh| = σ(30)(1 − σ(30)) ≈ e^−30 ≈ 9e−14, DPO's = 0.1·(1 − σ(3)) = 0.00474.
    Bounded loss: when the pair separates the wrong way (h → −∞) MPO's gradient also vanishes (e^−30 at
    h = −30), while DPO's tends to β (0.1·σ(3) = 0.0953 at h = −30).
    Shape, at any equal β: |dMPO/dh| = σ(βh)·|dDPO/dh| (β σ(1−σ) vs β(1−σ)), never more than DPO's, and at
    most β/4. (For h → +∞ both decay like e^−βh; the difference there is the scale β acts on.)"""
    h = [-30.0, -10.0, 0.0, 10.0, 30.0]
    mpo_grad, dpo_grad = margin_gradients(h, mpo_beta=1.0, dpo_beta=0.1)
    assert mpo_grad[-1] < 1e-12 and mpo_grad[0] < 1e-12
    assert dpo_grad[-1].item() == pytest.approx(0.1 * (1 - 1 / (1 + math.exp(-3))), rel=1e-6)
    assert dpo_grad[0].item() == pytest.approx(0.1 / (1 + math.exp(-3)), rel=1e-6)
    assert mpo_grad[2].item() == pytest.approx(0.25)  # the maximum, at h = 0
    # monotone decay away from h = 0 for MPO, monotone increase toward h = −∞ for DPO
    assert mpo_grad[3] < mpo_grad[2] and mpo_grad[4] < mpo_grad[3] and mpo_grad[1] < mpo_grad[2]
    assert dpo_grad[0] > dpo_grad[1] > dpo_grad[2] > dpo_grad[3] > dpo_grad[4]
    for beta in (0.1, 1.0):
        mpo_g, dpo_g = margin_gradients(h, beta, beta)
        sig = torch.sigmoid(beta * torch.tensor(h, dtype=torch.float64))
        torch.testing.assert_close(mpo_g, sig * dpo_g)
        assert (mpo_g <= beta / 4 + 1e-12).all()


def test_listwise_hand_values_and_pairs():
    """log π = (−1, −2, −3), top = candidate 1 (ranking [1, 0, 2]), β = 1:
    L = −e^−2 / (e^−1 + e^−2 + e^−3) = −1/(e + 1 + e^−1) = −0.244728.
    Candidate 2 masked out: L = −e^−2/(e^−1 + e^−2) = −σ(−1) = −0.268941.
    β = 2: L = −e^−4/(e^−2 + e^−4 + e^−6) = −1/(e² + 1 + e^−2) = −0.117020."""
    logps, ranking = t(-1, -2, -3)[None], torch.tensor([[1, 0, 2]])
    losses, weights = mpo_listwise_loss(logps, ranking, beta=1.0)
    assert losses.item() == pytest.approx(-1 / (math.e + 1 + 1 / math.e))
    assert weights.sum().item() == pytest.approx(1.0)
    mask = torch.tensor([[True, True, False]])
    masked, masked_weights = mpo_listwise_loss(
        logps, torch.tensor([[1, 0, -1]]), beta=1.0, candidate_mask=mask
    )
    assert masked.item() == pytest.approx(-0.2689414214)
    assert masked_weights[0, 2] == 0
    assert mpo_listwise_loss(logps, ranking, beta=2.0)[0].item() == pytest.approx(
        -1 / (math.e**2 + 1 + math.e**-2)
    )
    # two candidates: exactly the pairwise loss, whichever of the two is ranked first
    chosen, rejected = torch.randn(8), torch.randn(8)
    pair_logps = torch.stack([chosen, rejected], 1)
    listwise, _ = mpo_listwise_loss(pair_logps, torch.tensor([[0, 1]] * 8), beta=0.7)
    torch.testing.assert_close(listwise, mpo_loss(chosen, rejected, beta=0.7)[0])
    swapped, _ = mpo_listwise_loss(pair_logps, torch.tensor([[1, 0]] * 8), beta=0.7)
    torch.testing.assert_close(swapped, mpo_loss(rejected, chosen, beta=0.7)[0])


def test_listwise_is_shift_invariant_and_only_the_top_matters():
    """softmax(β(l + c)) = softmax(βl): a prompt-dependent constant in every log π changes nothing; the order
    of the candidates below the top does not either (only the top's weight is maximized)."""
    logps = torch.randn(4, 5)
    ranking = torch.tensor([[2, 0, 1, 3, 4], [0, 1, -1, -1, -1], [4, -1, -1, -1, -1], [1, 2, 3, 4, 0]])
    losses, _ = mpo_listwise_loss(logps, ranking, beta=1.3)
    shifted, _ = mpo_listwise_loss(logps + torch.randn(4, 1) * 10, ranking, beta=1.3)
    torch.testing.assert_close(losses, shifted)
    reordered = torch.cat([ranking[:, :1], ranking[:, 1:].flip(1)], 1)
    torch.testing.assert_close(mpo_listwise_loss(logps, reordered, beta=1.3)[0], losses)


def test_regularization_nll_hand_values():
    """log π(y|x) = −6 over |y| = 3 tokens: per-token NLL 6/3 = 2, sequence NLL 6; |y| = 0 is clamped to 1.
    Its gradient is −1/|y| per unit of log π (it pulls up the likelihood of reference samples)."""
    logps, n_tokens = t(-6, -1).requires_grad_(), torch.tensor([3, 0])
    nll = regularization_nll(logps, n_tokens)
    torch.testing.assert_close(nll, t(2, 1))
    torch.testing.assert_close(regularization_nll(logps, n_tokens, per_token=False), t(6, 1))
    nll.sum().backward()
    torch.testing.assert_close(logps.grad, t(-1 / 3, -1))


# ---------------------------------------------------------------- recipe

SUBJECTS = ["the pizza place", "the sushi bar", "the taco truck", "the ramen shop", "the coffee house"]


@pytest.fixture(scope="module")
def tokenizer():
    from prefalign.worlds.reviews import build_tokenizer

    return build_tokenizer()


def tiny_model(tokenizer, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=1,
        n_head=2,
        n_embd=16,
        n_positions=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def pair_records(n=16):
    """Pairs on 5 prompts: "was tasty ." beats "was bland ."."""
    return [
        PreferenceRecord.pair(f"review: {SUBJECTS[i % 5]}", "the food was tasty .", "the food was bland .")
        for i in range(n)
    ]


def make_cfg(tmp_path, **mpo_settings):
    settings = {"samples_per_prompt": 2, "max_new_tokens": 6, "chunk_prompts": 2, **mpo_settings}
    return build(
        mpo.Config,
        {
            "model": {"name_or_path": "in-memory"},  # recorded only: the tests pass the policy
            "data": {"max_length": 32, "max_prompt_length": 8},
            "mpo": settings,
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 3,
                "batch_size": 4,
                "log_every": 1,
                "learning_rate": 1e-2,
                "lr_scheduler": "constant",
                "progress": False,
            },
        },
    )


@pytest.mark.parametrize("preference_term", [True, False])
def test_step_is_one_forward_of_preference_plus_lambda_regularization(tokenizer, preference_term):
    """The batch loss is mean_i(−σ(β(ℓ(y_w) − ℓ(y_l)))) + λ·mean_j(−log π(y_j)/|y_j|) + λ_x·mean(extra), with
    ℓ = log π/|y| (average_logps, the default),
    recomputed here from separate forwards over the pairs, the regularization and the extra samples; the
    step itself runs the model exactly once. `preference_term: false` (the regularizer-only control) drops
    the first term from the loss and keeps logging it."""
    model = tiny_model(tokenizer).eval()  # no dropout, so separate forwards compare
    pairs = encode_records(tokenizer, pair_records(3), max_length=32, max_prompt_length=8)
    reg = mpo.encode_samples(
        tokenizer,
        [
            ("review: the taco truck", "the salsa was fresh ."),
            ("review: the sushi bar", "the staff were rude ."),
            ("review: the pizza place", ""),
        ],
        mpo.DataConfig(),
    )
    extra = mpo.encode_samples(tokenizer, [("", "the bread was stale .")] * 3, mpo.DataConfig())
    settings = mpo.LossConfig(
        beta=0.5, regularization_weight=0.3, extra_weight=2.0, preference_term=preference_term
    )
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    loss, metrics = mpo.make_step(settings)(
        model, mpo.collate_mpo(list(zip(pairs, reg, extra)), tokenizer.pad_token_id)
    )
    handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        logps, n_tokens = sequence_logps(model, collate(pairs, tokenizer.pad_token_id))
        logps = logps / n_tokens  # average_logps (the default): mean token log-probs in the preference term
        preference = -torch.sigmoid(0.5 * (logps[:, 0] - logps[:, 1])).mean()
        reg_logps, reg_tokens = sequence_logps(model, collate(reg, tokenizer.pad_token_id))
        extra_logps, extra_tokens = sequence_logps(model, collate(extra, tokenizer.pad_token_id))
        reg_nll = (-reg_logps[:, 0] / reg_tokens[:, 0]).mean()
        extra_nll = (-extra_logps[:, 0] / extra_tokens[:, 0]).mean()
    expected = preference * preference_term + 0.3 * reg_nll + 2.0 * extra_nll
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["mpo/regularization_nll"].item() == pytest.approx(reg_nll.item(), rel=1e-5)
    assert metrics["mpo/preference_weight"].item() == pytest.approx(-preference.item(), rel=1e-5)


def test_training_loads_and_runs_no_reference(tokenizer, tmp_path, monkeypatch):
    """During `train` every forward with gradients is the policy's, exactly one per optimizer step; the
    reference machinery of the DPO recipe is never called and no model is loaded. The regularization set is
    sampled once (no-grad forwards of the untouched policy) and stored as chunks in the run directory."""

    def forbidden(*args, **kwargs):
        raise AssertionError("MPO must not use a reference model")

    for module, name in [
        (reference, "live_reference"),
        (reference, "precompute_reference_logps"),
        (dpo_recipe, "prepare_reference"),
        (reference, "prepare_reference"),
        (mpo, "load_policy"),
        (mpo, "load_base_model"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    policy = tiny_model(tokenizer)
    forwards = []

    def hook(module, args, output):
        if module.__class__.__name__ == "GPT2LMHeadModel":
            forwards.append((id(module), torch.is_grad_enabled()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        cfg = make_cfg(tmp_path)
        run_dir = runner.run(cfg, records=pair_records(), model=policy, tokenizer=tokenizer).run_dir
    finally:
        handle.remove()
    with_grad = [model_id for model_id, grad in forwards if grad]
    assert with_grad == [id(policy)] * cfg.train.max_steps
    assert {model_id for model_id, _ in forwards} == {id(policy)}
    samples = mpo.load_regularization_data(run_dir / "regularization")
    assert len(samples) == 5 * 2 and sorted({p for p, _ in samples}) == sorted(
        f"review: {s}" for s in SUBJECTS
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["mpo/regularization_nll"] > 0 for m in metrics)


def test_regularization_data_resumes_and_frees_the_reference(tokenizer, tmp_path, monkeypatch):
    """5 prompts in chunks of 2 -> 3 chunk files. A killed run (chunk 1 missing, a stale temp file left)
    regenerates only chunk 1, identical to the first time (each chunk has its own seed). Other settings on
    the same directory are refused. A reference loaded by the function itself is freed before it returns."""
    loaded = []

    def load_base_model(model_cfg):
        model = tiny_model(tokenizer, seed=1)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(mpo, "load_base_model", load_base_model)
    monkeypatch.setattr(mpo, "load_tokenizer", lambda model_cfg: tokenizer)
    cfg = make_cfg(tmp_path)
    out = mpo.make_regularization_data(cfg, records=pair_records())
    assert len(loaded) == 1 and loaded[0]() is None  # freed
    chunks = sorted(p.name for p in out.glob("chunk-*.jsonl"))
    assert chunks == ["chunk-00000.jsonl", "chunk-00001.jsonl", "chunk-00002.jsonl"]
    first = mpo.load_regularization_data(out)
    (out / "chunk-00001.jsonl").unlink()
    (out / ".tmp-chunk-00001.jsonl-123").write_text('{"prompt": "half')
    with pytest.raises(ConfigError, match="incomplete"):
        mpo.load_regularization_data(out)
    generated = []
    original = mpo.generate_responses
    monkeypatch.setattr(mpo, "generate_responses", lambda *a, **k: generated.append(1) or original(*a, **k))
    mpo.make_regularization_data(cfg, records=pair_records())
    assert len(generated) == 1 and mpo.load_regularization_data(out) == first
    other = make_cfg(tmp_path, temperature=0.5)
    with pytest.raises(ConfigError, match="other settings.*temperature"):
        mpo.make_regularization_data(other, records=pair_records())


def test_resume_is_exact(tokenizer, tmp_path):
    """4 steps straight == 2 steps, stop, resume to 4 in a fresh process (a fresh model object; constant lr):
    the item <-> regularization sample pairing and the data order are fixed, and the regularization data on
    disk is reused (the resumed run could not regenerate it: its policy is not the reference any more)."""
    records = pair_records()

    def run(name, steps, policy):
        cfg = make_cfg(tmp_path / name)
        cfg.train.max_steps, cfg.train.save_every = steps, 2
        return runner.run(cfg, records=records, model=policy, tokenizer=tokenizer).model

    straight = run("a", 4, tiny_model(tokenizer))
    run("b", 2, tiny_model(tokenizer))
    resumed = run("b", 4, tiny_model(tokenizer, seed=7))  # its own weights are replaced by the checkpoint
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_extra_text_and_config_errors(tmp_path):
    """Bad extra text names the file, row and field; inconsistent settings are refused when the config is
    built; the example config builds."""
    import yaml

    bad = tmp_path / "extra.jsonl"
    bad.write_text('{"text": "the food was good ."}\n{"txt": "oops"}\n')
    with pytest.raises(ConfigError, match=r"extra.jsonl: row 1: field 'text'"):
        mpo.load_extra_text(bad)
    good = tmp_path / "extra.txt"
    good.write_text("the food was good .\n\nthe staff were rude .\n")
    assert mpo.load_extra_text(good) == [("", "the food was good ."), ("", "the staff were rude .")]
    with pytest.raises(ConfigError, match="extra_weight"):
        build(mpo.Config, {"loss": {"extra_weight": 0.5}})
    with pytest.raises(ConfigError, match="loss.beta"):
        build(mpo.Config, {"loss": {"beta": 0}})
    data = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "mpo_reviews.yaml")))
    assert data.pop("method") == "mpo"
    build(mpo.Config, data)
