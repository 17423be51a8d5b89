"""Evaluation over a set of records does not depend on how they are split into batches (issue 11, fault 11).

Record weights [1, 1, 1, 9]: the right held-out loss is Σ w·loss / Σ w and the right accuracy Σ w·[margin > 0]
/ Σ w, computed here record by record from naive batch-1 log-probs and the loss formulas written out."""

import math

import pytest
import torch

from inputs_tiny import byte_bpe, gpt2, naive_logp
from prefalign.core.data import PreferenceRecord
from prefalign.core.encode import encode_records
from prefalign.core.reference import precompute_reference_logps
from prefalign.methods import dpo, mpo

torch.set_num_threads(1)
WEIGHTS = [1.0, 1.0, 1.0, 9.0]
BETA = 0.5


@pytest.fixture(scope="module")
def setup():
    tok = byte_bpe()
    policy, reference = gpt2(tok, seed=1), gpt2(tok, seed=2)
    records = [
        PreferenceRecord.pair("Is water wet?", " yes it is.", " no.", weight=WEIGHTS[0]),
        PreferenceRecord.pair(
            "the cat sat on the", " mat.", " dog and the tree and the river.", weight=WEIGHTS[1]
        ),
        PreferenceRecord.pair("Hello", " world.", " sure, maybe never.", weight=WEIGHTS[2]),
        PreferenceRecord.pair("the sky is", " blue today.", " red.", weight=WEIGHTS[3]),
    ]
    encoded = encode_records(tok, records, 64, 32)
    precompute_reference_logps(reference, encoded, pad_token_id=tok.pad_token_id, batch_size=1)
    naive = []  # (policy chosen, policy rejected, reference chosen, reference rejected, chosen/rejected lengths)
    for e in encoded:
        c, r = e.response_ids
        naive.append((naive_logp(policy, e.prompt_ids, c), naive_logp(policy, e.prompt_ids, r),
                      naive_logp(reference, e.prompt_ids, c), naive_logp(reference, e.prompt_ids, r), len(c), len(r)))  # fmt: skip
    return tok, policy, encoded, naive


def weighted(values):
    return sum(w * v for w, v in zip(WEIGHTS, values)) / sum(WEIGHTS)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_dpo_eval_is_the_weighted_mean_over_records(setup, batch_size):
    tok, policy, encoded, naive = setup
    margins = [BETA * ((pc - rc) - (pl - rl)) for pc, pl, rc, rl, _, _ in naive]
    right_loss = weighted([-math.log(1 / (1 + math.exp(-m))) for m in margins])
    right_accuracy = weighted([float(m > 0) for m in margins])
    assert 0 < right_accuracy < 1  # the weights matter for this set
    loss = dpo.PreferenceLoss(dpo.LossConfig(name="dpo", beta=BETA))
    got = dpo.evaluate_loss(policy, encoded, loss, tok.pad_token_id, batch_size)
    assert got["loss"] == pytest.approx(right_loss, abs=1e-5)
    assert got["rewards/accuracies"] == pytest.approx(right_accuracy, abs=1e-6)
    assert got["rewards/margins"] == pytest.approx(weighted(margins), abs=1e-5)
    assert got["logps/chosen"] == pytest.approx(weighted([n[0] for n in naive]), abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_mpo_eval_is_the_weighted_mean_over_records(setup, batch_size):
    """MPO's preference term on a pair: −σ(β·(ℓ_w − ℓ_l)) with ℓ the mean log-prob per token (its default)."""
    tok, policy, encoded, naive = setup
    terms = [-1 / (1 + math.exp(-BETA * (pc / nc - pl / nl))) for pc, pl, _, _, nc, nl in naive]
    got = mpo.evaluate_preferences(policy, encoded, mpo.LossConfig(beta=BETA), tok.pad_token_id, batch_size)
    assert got["mpo/preference_loss"] == pytest.approx(weighted(terms), abs=1e-5)
    right_accuracy = weighted([float(pc / nc > pl / nl) for pc, pl, _, _, nc, nl in naive])
    assert got["rewards/accuracies"] == pytest.approx(right_accuracy, abs=1e-6)
