"""One loss-construction path: every loss of every method takes exactly the options its signature has, an
option it does not take is a config error naming the key and the loss, and one it does take acts. The ends
of (partial) rankings used by every metric, with hand values."""

import math

import pytest
import torch

from prefalign.core.config import ConfigError, build, build_loss, loss_options
from prefalign.core.metrics import preference_metrics, ranked_ends
from prefalign.methods import diffusion_dpo, dpo, mpo, pfm, sspo
from prefalign.methods.em_dpo import em

METHODS = {"dpo": dpo, "mpo": mpo, "em_dpo": em, "pfm": pfm, "diffusion_dpo": diffusion_dpo, "sspo": sspo}
CONSUMED = {"dpo": ("average_logps",), "mpo": mpo.CONSUMED}
OPTION_VALUES = {"beta": 0.7, "label_smoothing": 0.2, "gamma": 0.3, "ssr": "indicator"}


def loss_fields(module):
    return [f for f in module.LossConfig.__dataclass_fields__ if f != "name"]


CASES = [
    (method, name, option)
    for method, module in METHODS.items()
    for name in module.LOSSES
    for option in loss_fields(module)
    if option not in CONSUMED.get(method, ())
]


@pytest.mark.parametrize("method, name, option", CASES, ids=lambda x: str(x))
def test_an_option_is_accepted_exactly_when_the_loss_takes_it(method, name, option):
    module = METHODS[method]
    fn = module.LOSSES[name]
    section = {"name": name, option: OPTION_VALUES[option]}
    if option in loss_options(fn):
        built = build(module.LossConfig, section, prefix="loss.")
        assert build_loss(built, module.LOSSES, CONSUMED.get(method, ()))[2][option] == OPTION_VALUES[option]
    else:
        with pytest.raises(
            ConfigError, match=rf"config key 'loss.{option}': loss '{name}' has no option '{option}'"
        ):
            build(module.LossConfig, section, prefix="loss.")


def test_every_loss_option_changes_the_loss():
    """The options a config can set are the ones that act: at h = 2 (chosen 1 nat up, rejected 1 nat down vs
    the reference), each option moves the DPO-family loss away from its default."""
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    for name, fn in dpo.LOSSES.items():
        if name in ("plackett_luce", "sft", "simpo"):
            continue
        base = fn(pc, pr, rc, rr)[0]
        for option, value in loss_options(fn).items():
            changed = fn(pc, pr, rc, rr, **{option: OPTION_VALUES[option]})[0]
            assert not torch.allclose(base, changed), (name, option, value)


def test_label_smoothing_is_refused_by_losses_that_ignore_it():
    """The fault of the past: `loss.label_smoothing: 0.3` with ipo, hinge or plackett_luce changed nothing."""
    for name in ("ipo", "hinge", "plackett_luce", "simpo", "sft"):
        with pytest.raises(ConfigError, match="label_smoothing"):
            build(dpo.Config, {"loss": {"name": name, "label_smoothing": 0.3}})
    cfg = build(dpo.Config, {"loss": {"name": "dpo", "label_smoothing": 0.3}})
    loss = dpo.PreferenceLoss(cfg.loss)
    h = torch.tensor([[-1.0, -3.0]])  # policy log-probs; reference 0: margin h = 2, β = 0.1
    losses, _ = loss(
        h, torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    )
    expected = -0.7 * math.log(1 / (1 + math.exp(-0.2))) - 0.3 * math.log(1 / (1 + math.exp(0.2)))
    assert losses.item() == pytest.approx(expected, rel=1e-6)


def test_ranked_ends_hand_values():
    """4 candidates. Full ranking [2, 0, 3, 1]: best 2, worst tier {1}. Top-2 [3, 1]: best 3, worst tier =
    the unranked {0, 2}. Top-1 of 3 present (column 3 absent) [1]: best 1, worst tier {0, 2}. A pair [1, 0]
    padded to 4 columns: best 1, worst {0}."""
    ranking = torch.tensor([[2, 0, 3, 1], [3, 1, -1, -1], [1, -1, -1, -1], [1, 0, -1, -1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    best, worst = ranked_ends(ranking, mask)
    assert best.tolist() == [2, 3, 1, 1]
    assert worst.int().tolist() == [[0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0]]


def test_partial_ranking_metrics_hand_values():
    """Top-1 of 3, rewards (0.3, 0.9, -0.3), best = 1: rewards/chosen 0.9, rejected = mean of the unranked
    (0.3 + -0.3) / 2 = 0, margin 0.9, accuracy 1. The past definition (rejected = last ranked = the best
    itself) gave margins of exactly 0 for every top-1 ranking. Weights (1, 3) weight the record means."""
    rewards = torch.tensor([[0.3, 0.9, -0.3], [0.5, -0.5, 0.1]])
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    ranking = torch.tensor([[1, -1, -1], [0, 2, 1]])  # second: full ranking 0 > 2 > 1
    losses = torch.tensor([1.0, 2.0])
    loss, m = preference_metrics(losses, torch.tensor([1.0, 3.0]), rewards, logps, ranking)
    assert loss.item() == pytest.approx((1 * 1 + 3 * 2) / 4)
    assert m["rewards/chosen"].item() == pytest.approx((0.9 + 3 * 0.5) / 4)
    assert m["rewards/rejected"].item() == pytest.approx((0.0 + 3 * -0.5) / 4)
    assert m["rewards/margins"].item() == pytest.approx((0.9 + 3 * 1.0) / 4)
    assert m["rewards/accuracies"].item() == pytest.approx(1.0)
    assert m["logps/chosen"].item() == pytest.approx((-2.0 + 3 * -4.0) / 4)
    assert m["logps/rejected"].item() == pytest.approx((-2.0 + 3 * -5.0) / 4)
