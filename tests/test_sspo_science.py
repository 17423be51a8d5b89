"""SSPO's sign estimated from several (t, ε) draws (`sspo.sign_draws`) and its logged agreement with a
many-draw estimate (`sspo.sign_check_draws`): hand values, brute force, resume, and the demo's data."""

import math

import pytest
import torch

from prefalign import runner
from prefalign.core import images, pipelines
from prefalign.core.config import build
from prefalign.core.errors import ConfigError
from prefalign.core.report import read_metrics
from prefalign.losses.diffusion import sspo_loss
from prefalign.methods import sspo
from test_diffusion_defects import tiny_base  # a random tiny digits UNet folder + 8 winners

torch.set_num_threads(1)
t = torch.tensor


# ---------------------------------------------------------------- the loss takes the sign from an estimate


def test_loss_reads_the_sign_from_the_given_estimate():
    """mw=.5, cw=.4 (Δ_w = +0.1), mr=.3, cr=.5 (Δ_r = −0.2), β = 10.
    This draw's sign: Δ_w > 0 => s = −1 => inside = −5·(0.1 − (−1)(−0.2)) = 0.5, loss = log(1 + e^−0.5).
    With the estimate −0.05 (≤ 0) => s = +1 => inside = −5·(0.1 + 0.2) = −1.5, loss = log(1 + e^1.5);
    the same for `indicator` (c = 1); a tie (estimate 0) is s = +1; `none` ignores the estimate.
    Indicator with this draw's sign: c = 0 => inside = −5·0.1 = −0.5, loss = log(1 + e^0.5)."""
    mw, mr, cw, cr = t([0.5]), t([0.3]), t([0.4]), t([0.5])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log σ(z) = log(1 + e^−z)
    loss, sign, inside = sspo_loss(mw, mr, cw, cr, beta=10.0)
    assert (
        sign.item() == -1
        and inside.item() == pytest.approx(0.5)
        and loss.item() == pytest.approx(softplus(-0.5))
    )
    for estimate in (-0.05, 0.0):
        for ssr in ("sign", "indicator"):
            loss, sign, inside = sspo_loss(mw, mr, cw, cr, 10.0, ssr, sign_delta_w=t([estimate]))
            assert sign.item() == 1 and loss.item() == pytest.approx(softplus(1.5), rel=1e-6)
    loss, _, _ = sspo_loss(mw, mr, cw, cr, 10.0, "indicator")
    assert loss.item() == pytest.approx(softplus(0.5), rel=1e-6)
    loss, sign, _ = sspo_loss(mw, mr, cw, cr, 10.0, "none", sign_delta_w=t([0.3]))
    assert sign.item() == 1 and loss.item() == pytest.approx(softplus(1.5), rel=1e-6)


def test_estimate_equal_to_this_draw_gives_the_same_numbers_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    mw, mr, cw, cr = (torch.rand(16, generator=g) * 0.2 for _ in range(4))
    for ssr in ("sign", "indicator"):
        plain = sspo_loss(mw, mr, cw, cr, 300.0, ssr)
        given = sspo_loss(mw, mr, cw, cr, 300.0, ssr, sign_delta_w=mw - cw)
        assert all(torch.equal(a, b) for a, b in zip(plain, given))


# ---------------------------------------------------------------- the step: brute force over the draws


def prepared_step(tmp_path, monkeypatch, ssr="sign", **sspo_section):
    """A tiny UNet after 3 updates (snapshots 0..2), its live weights perturbed so that Δ_w takes both signs,
    x_ref fixed (its sampling is tested elsewhere). Returns (step, unet, state, batch, x_ref, base, cfg)."""
    base, data = tiny_base(tmp_path)
    cfg = build(sspo.Config, {"model": {"name_or_path": base}, "data": {"train": data},
                              "loss": {"beta": 300.0, "ssr": ssr}, "sspo": {"bank": {"save_every": 1, "size": 5}, "reference_sample": {"steps": 2},
                                       **sspo_section}})  # fmt: skip
    parts = pipelines.load_base(cfg.model)
    unet, sched = parts.unet, parts.scheduler
    state = sspo.SSPOState(unet, cfg, 1)
    batch = images.collate_images([images.load_image_data(data, need_rejected=False)[i] for i in range(8)])
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    plain = build(sspo.Config, {"model": {"name_or_path": base}, "data": {"train": data},
                                "sspo": {"bank": {"save_every": 1, "size": 5}, "reference_sample": {"steps": 2}}})  # fmt: skip
    warmup = sspo.make_step(sched, state, plain)
    for _ in range(3):
        warmup(unet, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    x_ref = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    monkeypatch.setattr(sspo, "reference_samples", lambda *a, **k: x_ref.clone())
    monkeypatch.setattr(state.bank, "draw", lambda: 0)  # the initial snapshot: age 3 at the next step
    return sspo.make_step(sched, state, cfg), unet, state, batch, x_ref, base, sched


def draw_queue(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 1, 8, 8, generator=g)) for _ in range(n)
    ]


def error_one_by_one(net, sched, x0, labels, timesteps, noise):
    """e(net, x0) per row, each row alone (batch 1): x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, target ε."""
    out = []
    for i in range(len(x0)):
        a = sched.alphas_cumprod[timesteps[i]]
        x_t = a.sqrt() * x0[i : i + 1] + (1 - a).sqrt() * noise[i : i + 1]
        pred = net(x_t, timesteps[i : i + 1], class_labels=labels[i : i + 1]).sample
        out.append(((pred - noise[i : i + 1]) ** 2).mean())
    return torch.stack(out)


@pytest.mark.parametrize("ssr", ["sign", "indicator"])
def test_multi_draw_sign_and_its_agreement_equal_a_brute_force_recomputation(ssr, tmp_path, monkeypatch):
    """sign_draws = 4: s = +1 iff the mean over the 4 draws (the loss's own first) of Δ_w, each row computed
    alone, is ≤ 0; the loss uses the first draw only. sign_check_draws = 6: sspo/sign_agreement = fraction of
    rows whose s equals the sign of the mean Δ_w over 6 other draws; ..._one_draw compares the first draw's
    own sign. Loss, flip rate and both agreements must match; the 4-draw sign must differ from the
    one-draw sign on some row (else this test could not tell them apart)."""
    step, unet, state, batch, x_ref, base, sched = prepared_step(
        tmp_path, monkeypatch, ssr, sign_draws=4, sign_check_draws=6, sign_check_every=1
    )
    train_draws, check_draws = draw_queue(4, seed=11), draw_queue(6, seed=12)
    queues = {"train": list(train_draws), "check": list(check_draws)}

    def fake(scheduler, x, generator=None):
        name = "train" if generator is None else "check"
        timesteps, noise = queues[name].pop(0)
        return timesteps.clone(), noise.clone()

    monkeypatch.setattr(sspo, "draw_timesteps_and_noise", fake)
    loss, metrics = step(unet, batch)
    assert queues == {"train": [], "check": []}  # 1 + 3 training draws, 6 check draws, nothing more

    ckpt = pipelines.load_parts(base).unet.eval()
    ckpt.load_state_dict(state.bank.entries[0])
    x_w, labels = batch["chosen"], batch["context"]
    with torch.no_grad():

        def delta(draws, x0):
            return torch.stack([
                error_one_by_one(unet, sched, x0, labels, ts, eps) - error_one_by_one(ckpt, sched, x0, labels, ts, eps)
                for ts, eps in draws
            ])  # fmt: skip

        d_w_all = delta(train_draws, x_w)  # [4, 8]
        d_r = delta(train_draws[:1], x_ref)[0]
        s = torch.where(d_w_all.mean(0) <= 0, 1.0, -1.0)
        s_one = torch.where(d_w_all[0] <= 0, 1.0, -1.0)
        s_check = torch.where(delta(check_draws, x_w).mean(0) <= 0, 1.0, -1.0)
        c = (s > 0).float() if ssr == "indicator" else s
        mine = -torch.nn.functional.logsigmoid(-0.5 * 300.0 * (d_w_all[0] - c * d_r)).mean()
    assert not torch.equal(s, s_one)
    assert loss.item() == pytest.approx(mine.item(), rel=1e-4)
    assert metrics["sspo/flip_rate"].item() == pytest.approx(float((s < 0).float().mean()))
    assert metrics["sspo/sign_agreement"].item() == pytest.approx(float((s == s_check).float().mean()))
    assert metrics["sspo/sign_agreement_one_draw"].item() == pytest.approx(
        float((s_one == s_check).float().mean())
    )


def test_the_check_is_skipped_when_the_snapshot_is_the_current_model(tmp_path, monkeypatch):
    """draw = latest with a snapshot every update: every Δ_w is exactly 0, so there is nothing to check."""
    step, unet, state, batch, *_ = prepared_step(
        tmp_path, monkeypatch, sign_check_draws=3, sign_check_every=1
    )
    monkeypatch.setattr(state.bank, "draw", lambda: len(state.bank.entries) - 1)
    state.bank.add_if_due(unet, 3)
    _, metrics = step(unet, batch)
    assert metrics["sspo/snapshot_age"] == 0 and "sspo/sign_agreement" not in metrics


# ---------------------------------------------------------------- runs: the check does not change training


def sspo_run(tmp_path, name, base, data, steps=4, **sspo_section):
    cfg = build(sspo.Config, {
        "model": {"name_or_path": base}, "data": {"train": data}, "loss": {"beta": 300.0},
        "sspo": {"bank": {"save_every": 1, "size": 3, "draw": "initial"}, "reference_sample": {"steps": 2},
                 **sspo_section},
        "train": {"output_dir": str(tmp_path / name), "max_steps": steps, "batch_size": 4, "learning_rate": 1e-3,
                  "progress": False, "log_every": 1, "save_every": 2, "lr_scheduler": "constant"},
    })  # fmt: skip
    return read_metrics(runner.run(cfg).run_dir)


def test_the_check_leaves_training_unchanged_and_a_multi_draw_run_resumes(tmp_path):
    """The check draws from its own generator: losses with and without it are the same. With sign_draws = 3
    (extra draws from the global RNG) a run stopped at step 2 and resumed to 4 logs the same losses."""
    base, data = tiny_base(tmp_path)
    off = sspo_run(tmp_path, "off", base, data, sign_draws=3)
    on = sspo_run(tmp_path, "on", base, data, sign_draws=3, sign_check_draws=4, sign_check_every=1)
    assert [m["loss"] for m in on] == pytest.approx([m["loss"] for m in off], rel=1e-6)
    agreements = [m["sspo/sign_agreement"] for m in on if "sspo/sign_agreement" in m]
    assert len(agreements) == 3 and all(0 <= a <= 1 for a in agreements)  # draw initial: age 0 at step 1 only
    sspo_run(tmp_path, "resumed", base, data, steps=2, sign_draws=3)
    resumed = sspo_run(tmp_path, "resumed", base, data, steps=4, sign_draws=3)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in off], rel=1e-5)
    assert len({m["loss"] for m in off}) > 1


def test_sign_options_are_checked():
    def cfg(**sections):
        return build(sspo.Config, {"model": {"name_or_path": "x"}, "data": {"train": "w.npz"}, **sections})

    for bad in ({"sign_draws": 0}, {"sign_check_draws": -1}, {"sign_check_every": 0}):
        with pytest.raises(ConfigError, match="sspo.sign"):
            cfg(sspo=bad)
    for loss in ({"ssr": "none"}, {"name": "sft"}):
        with pytest.raises(ConfigError, match="sspo.sign_draws"):
            cfg(loss=loss, sspo={"sign_draws": 4})
        with pytest.raises(ConfigError, match="sspo.sign_check_draws"):
            cfg(loss=loss, sspo={"sign_check_draws": 8})
    assert cfg(loss={"ssr": "indicator"}, sspo={"sign_draws": 4}).sspo.sign_draws == 4


# ---------------------------------------------------------------- the demo's data and its report (tiny form)


def test_external_winners_are_real_digits_the_base_and_the_evaluator_never_saw():
    """The winners are the world's judge split: no image equals one of the DDPM's train split or of the
    evaluator's eval split; n = 0 takes all 539, n = 300 a seeded subset (another seed, another subset)."""
    from prefalign.demos.sspo import external_winners
    from prefalign.worlds.digits import make_world

    splits = make_world(0).splits
    images = lambda x: {tuple(v.flatten().tolist()) for v in x}  # noqa: E731
    everything = external_winners(0, seed=0)
    assert len(everything["chosen"]) == 539 and images(everything["chosen"]) == images(
        splits["judge"]["images"]
    )
    for name in ("train", "eval"):
        assert not images(everything["chosen"]) & images(splits[name]["images"])
    a, b = external_winners(300, seed=0), external_winners(300, seed=1)
    assert len(a["chosen"]) == 300 and not torch.equal(a["chosen"], b["chosen"])
    assert images(a["chosen"]) <= images(splits["judge"]["images"])


def test_sspo_demo_tiny_form_writes_every_row_and_claim(tmp_path):
    """The demo's plumbing on a tiny form (3 steps): every row and claim is in summary.json under its key,
    report.md has one line per claim, and SSPO's reference samples use the evaluation's step count."""
    from prefalign.demos import sspo as demo

    tiny = dict(n_winners=20, n_self_pairs=20, max_steps=3, eval_per_class=2, sample_steps=3, sign_draws=2,
                sign_check_draws=2, sign_check_every=1, save_every=1, log_every=1)  # fmt: skip
    summary = demo.run(tmp_path / "demo", quick=True, seeds=[0], overrides=tiny)
    assert list(summary["rows"]) == ["base", *demo.RUNS]
    for row in summary["rows"].values():
        assert {"score", "diversity", "gain"} <= row.keys()
    assert summary["rows"]["sspo_sign"]["flip_rate"][0] >= 0
    claims = summary["claims"]
    assert {"sspo_beats_sft", "ssr_beats_no_ssr", "indicator_about_equal_to_sign", "sspo_at_least_diffusion_dpo",
            "multi_draw_sign_beats_one_draw", "best_row"} <= claims.keys()  # fmt: skip
    assert all(isinstance(c["holds"], bool) and len(c["per_seed"]) == 1 for c in claims.values())
    report = (tmp_path / "demo" / "report.md").read_text()
    one_seed = "in this one seed (`--seeds 3` for a spread) —"  # no "holds here" on a single seed's gap
    assert sum(line.startswith("- ") and one_seed in line for line in report.splitlines()) == len(claims)
    saved = runner.config_of(tmp_path / "demo" / "seed-0" / "sspo_sign")
    assert saved.sspo.reference_sample.steps == tiny["sample_steps"] and saved.sspo.sign_check_draws == 2
    assert runner.config_of(tmp_path / "demo" / "seed-0" / "sspo_sign_multi").sspo.sign_draws == 2
