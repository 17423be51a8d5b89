"""Preference Flow Matching: loss, direction, solvers, coupling, context handling, save/load, recipe."""

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from prefalign import runner
from prefalign.methods import pfm


def small_config(steps=200, data="", **flow) -> pfm.Config:
    cfg = pfm.Config(
        model=pfm.FlowModelConfig(hidden=64, depth=2),
        data=pfm.FlowDataConfig(train=data),
        flow=pfm.FlowSettings(**flow),
    )
    cfg.train = replace(cfg.train, output_dir="", max_steps=steps, batch_size=256, progress=False)
    return cfg


def first_coordinate(samples, context=None):
    return samples[:, 0]


@pytest.fixture(scope="module")
def separable_flow():
    """Reference N(0, I) in 2-D, judge = first coordinate, pairs labelled by the judge."""
    torch.manual_seed(0)
    chosen, rejected, _ = pfm.collect_pairs(lambda n: torch.randn(n, 2), first_coordinate, 2000)
    return pfm.PreferenceFlow(small_config()).fit(chosen, rejected), chosen, rejected


def test_interpolate_and_loss_by_hand():
    """source y0=(0,0), target y1=(2,4), t=0.25, noise (1,-1), sigma=0.1:
    y_t = 0.25*(2,4) + 0.75*(0,0) + 0.1*(1,-1) = (0.6, 0.9); u = y1 - y0 = (2, 4).
    A field predicting (1, 1): loss = ((1-2)^2 + (1-4)^2) / 2 = (1 + 9) / 2 = 5 (mean over the 2 dims)."""
    y_t, u = pfm.interpolate(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 4.0]]), torch.tensor([0.25]),
                             torch.tensor([[1.0, -1.0]]), sigma=0.1)  # fmt: skip
    assert torch.allclose(y_t, torch.tensor([[0.6, 0.9]])) and torch.allclose(u, torch.tensor([[2.0, 4.0]]))
    assert pfm.flow_matching_loss(torch.tensor([[1.0, 1.0]]), u).item() == pytest.approx(5.0)


def test_flow_step_source_is_rejected_target_is_chosen():
    """sigma=0 and a field that returns chosen - rejected exactly (it reads them from the batch) has loss 0;
    the swapped direction (rejected - chosen) has loss mean((2u)^2) = 4*mean(u^2)."""
    chosen, rejected = torch.randn(16, 3), torch.randn(16, 3)
    right = lambda t, y, c: chosen - rejected  # noqa: E731
    wrong = lambda t, y, c: rejected - chosen  # noqa: E731
    batch = {"chosen": chosen, "rejected": rejected}
    assert pfm.flow_step(right, batch, sigma=0.0)[0].item() == pytest.approx(0.0, abs=1e-12)
    expected = 4 * (chosen - rejected).pow(2).mean().item()
    assert pfm.flow_step(wrong, batch, sigma=0.0)[0].item() == pytest.approx(expected, rel=1e-5)


def test_direction_flow_raises_the_judge_score(separable_flow):
    """The reference code trained preferred -> less preferred. Ours must move samples towards higher judge
    scores: E[judge] of N(0,1) is 0, of the best-of-2 is 1/sqrt(pi) ~ 0.56."""
    flow, chosen, rejected = separable_flow
    reference = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    improved = flow.improve(reference)
    assert first_coordinate(improved).mean() > 0.4
    assert abs(improved[:, 1].mean()) < 0.15  # the irrelevant coordinate is left alone
    backwards = pfm.PreferenceFlow(small_config()).fit(rejected, chosen)  # the reference code's bug
    assert first_coordinate(backwards.improve(reference)).mean() < -0.4


@pytest.mark.parametrize("method,steps,order", [("euler", 8, 1), ("midpoint", 8, 2), ("rk4", 4, 4)])
def test_fixed_step_solvers_converge_at_their_order(method, steps, order):
    """Linear field v = A y with A a rotation+decay: exact y(1) = expm(A) y0. Halving h divides the error by
    about 2^order."""
    A = torch.tensor([[-0.5, -2.0], [2.0, -0.5]], dtype=torch.float64)
    field = lambda t, y, c: y @ A.T  # noqa: E731
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    exact = y0 @ torch.linalg.matrix_exp(A).T
    err1 = (pfm.integrate(field, y0, method=method, steps=steps)[0] - exact).abs().max()
    y2, nfe = pfm.integrate(field, y0, method=method, steps=2 * steps)
    err2 = (y2 - exact).abs().max()
    assert nfe == 2 * steps * {"euler": 1, "midpoint": 2, "rk4": 4}[method]
    assert math.log2(err1 / err2) == pytest.approx(order, abs=0.35)


def test_dopri5_is_accurate_and_accepts_0d_time():
    A = torch.tensor([[-0.5, -2.0], [2.0, -0.5]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    y1, nfe = pfm.integrate(lambda t, y, c: y @ A.T, y0, method="dopri5", rtol=1e-9, atol=1e-9)
    assert torch.allclose(y1, y0 @ torch.linalg.matrix_exp(A).T, atol=1e-7) and nfe > 6
    # real fields get a 0-d t from torchdiffeq (the reference MLP broke on it)
    field = pfm.MLPField((2,), hidden=8, depth=1, time_dim=8).double()
    assert pfm.integrate(field, y0, method="dopri5")[0].shape == (1, 2)


def test_ot_pairing_stays_within_contexts_and_uncrosses():
    source = torch.tensor([[0.0], [10.0], [0.0], [10.0]])
    target = torch.tensor([[10.5], [0.5], [0.2], [9.8]])
    assert pfm.ot_pairing(source, target).tolist() in ([2, 3, 1, 0], [1, 3, 2, 0], [2, 0, 1, 3], [1, 0, 2, 3])
    assert pfm.ot_pairing(source[:2], target[:2]).tolist() == [1, 0]  # the crossed pairs get swapped
    context = torch.tensor([0, 0, 1, 1])  # now rows 0,1 and rows 2,3 may only pair among themselves
    perm = pfm.ot_pairing(source, target, context)
    assert perm.tolist() == [1, 0, 2, 3]
    assert (context[perm] == context).all()


def test_class_context_moves_each_class_its_own_way():
    """Class 0 prefers +x, class 1 prefers -x: one conditional flow must move them apart."""
    torch.manual_seed(0)
    labels = torch.arange(2).repeat(1500)
    sign = (1 - 2 * labels).float()
    chosen, rejected, context = pfm.collect_pairs(
        lambda c: torch.randn(len(c), 2), lambda y, c: y[:, 0] * (1 - 2 * c).float(), labels
    )
    flow = pfm.PreferenceFlow(small_config(coupling="ot")).fit(chosen, rejected, context)
    moved = flow.improve(torch.zeros(2000, 2), labels[:2000])
    assert (moved[:, 0] * sign[:2000]).mean() > 0.4
    with pytest.raises(ValueError, match="out of range"):
        flow.improve(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="expects context of kind 'class'"):
        flow.improve(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2 samples but 3 contexts"):
        flow.improve(torch.zeros(2, 2), torch.tensor([0, 1, 1]))


def test_vector_context_and_image_field_shapes():
    field = pfm.ConvField((1, 8, 8), hidden=16, depth=1, time_dim=8, context_kind="vector", context_dim=3)
    y = torch.randn(5, 1, 8, 8)
    assert field(torch.tensor(0.3), y, torch.randn(5, 3)).shape == y.shape
    with pytest.raises(ValueError, match="needs samples shaped"):
        pfm.ConvField((64,))


def test_save_load_round_trip(tmp_path, separable_flow):
    flow = separable_flow[0]
    path = flow.save(tmp_path / "flow")
    assert (path / "flow.safetensors").is_file() and (path / "flow.json").is_file()
    loaded = pfm.PreferenceFlow.load(path)
    y = torch.randn(50, 2)
    assert loaded.config == flow.config and loaded.meta == flow.meta
    assert torch.equal(loaded.improve(y), flow.improve(y))
    assert torch.equal(loaded.improve(y, method="rk4", steps=3), flow.improve(y, method="rk4", steps=3))


def test_bad_pairs_raise_errors_naming_file_field_and_row(tmp_path):
    chosen = np.random.randn(6, 2).astype(np.float32)
    bad = chosen.copy()
    bad[4, 1] = np.nan
    np.savez(tmp_path / "bad.npz", chosen=chosen, rejected=bad)
    with pytest.raises(ValueError, match=r"bad.npz: field 'rejected' row 4 has a non-finite value"):
        pfm.load_pairs(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", chosen=chosen, rejected=chosen[:5])
    with pytest.raises(ValueError, match="shape.npz: 'chosen' and 'rejected' must be .* same shape"):
        pfm.load_pairs(tmp_path / "shape.npz")
    np.savez(tmp_path / "missing.npz", chosen=chosen)
    with pytest.raises(ValueError, match="missing array 'rejected'"):
        pfm.load_pairs(tmp_path / "missing.npz")
    np.savez(tmp_path / "ctx.npz", chosen=chosen, rejected=chosen, context=np.arange(5))
    with pytest.raises(ValueError, match="'context' has 5 rows but 'chosen' has 6"):
        pfm.load_pairs(tmp_path / "ctx.npz")


def test_recipe_writes_a_run_dir_that_improves_and_resumes(tmp_path):
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    chosen, rejected, _ = pfm.collect_pairs(lambda n: torch.randn(n, 2), first_coordinate, 2000)
    save_file({"chosen": chosen.numpy(), "rejected": rejected.numpy()}, str(tmp_path / "pairs.safetensors"))
    cfg = small_config(steps=200, data=str(tmp_path / "pairs.safetensors"))
    cfg.train = replace(cfg.train, output_dir=str(tmp_path / "run"), log_every=50)
    run_dir = runner.run(cfg).run_dir
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/flow.safetensors"):
        assert (run_dir / name).is_file(), name
    flow = pfm.PreferenceFlow.load(run_dir / "final")
    assert first_coordinate(flow.improve(torch.randn(1000, 2))).mean() > 0.3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_pairs"] == 100 and summary["eval"]["loss"] is not None
    cfg.train = replace(cfg.train, max_steps=250)  # resumes from the step-200 checkpoint
    runner.run(cfg)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-200", "step-250"]


@pytest.mark.slow
def test_digits_pfm_beats_reference_on_the_held_out_evaluator():
    """End to end on digits: PFM (no judge at inference) raises the held-out evaluator's score."""
    from prefalign.worlds import digits

    quick = bool(os.environ.get("PREFALIGN_QUICK"))
    world = digits.make_world(0)
    torch.manual_seed(0)
    labels = torch.arange(10).repeat(150 if quick else 500)
    chosen, rejected, context = pfm.collect_pairs(world.generator, world.judge, labels)
    cfg = small_config(steps=300 if quick else 1500)
    cfg.model.hidden = 128 if quick else 256
    flow = pfm.PreferenceFlow(cfg).fit(chosen, rejected, context)
    test = torch.arange(10).repeat(30)
    reference = world.generator(test, seed=99)
    before = world.score(reference, test).mean()
    after = world.score(flow.improve(reference, test).clamp(0, 1), test).mean()
    assert after > before + 0.1


def test_assignment_coupling_equals_brute_force_and_pot():
    """`ot_pairing` and `toy2d.wasserstein` solve the uniform-weight OT problem by `linear_sum_assignment`.
    Ground truth: the best of all n! permutations (n <= 6, continuous random inputs, so the optimum is unique);
    where POT is installed, also its network simplex (`ot.emd`, `ot.emd2`), which they replaced."""
    import itertools

    from prefalign.worlds import toy2d

    generator = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        for _ in range(5):
            source, target = torch.randn(n, 3, generator=generator), torch.randn(n, 3, generator=generator)
            cost = torch.cdist(source.double(), target.double()).pow(2)
            best = min(itertools.permutations(range(n)), key=lambda p: sum(cost[i, p[i]] for i in range(n)))
            assert pfm.ot_pairing(source, target).tolist() == list(best)
            w2 = float(sum(cost[i, best[i]] for i in range(n)) / n) ** 0.5
            assert toy2d.wasserstein(source, target) == pytest.approx(w2, rel=1e-12)
    with pytest.raises(ValueError, match="equal size"):
        toy2d.wasserstein(torch.zeros(2, 2), torch.zeros(3, 2))
    try:
        import ot  # POT: the library this replaced, when installed
    except ImportError:
        return
    for n in (10, 40):
        source, target = torch.randn(n, 2, generator=generator), torch.randn(n, 2, generator=generator)
        cost = torch.cdist(source.double(), target.double()).pow(2).numpy()
        plan = ot.emd(ot.unif(n), ot.unif(n), cost)
        assert pfm.ot_pairing(source, target).tolist() == plan.argmax(1).tolist()
        expected = float(ot.emd2(ot.unif(n), ot.unif(n), cost, numItermax=1_000_000)) ** 0.5
        assert toy2d.wasserstein(source, target) == pytest.approx(expected, rel=1e-9)
