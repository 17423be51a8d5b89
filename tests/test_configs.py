"""Every shipped recipe in configs/ parses into its method's Config (no unknown keys, right types), and old
key spellings are moved to their new place with a one-line message."""

from pathlib import Path

import pytest

from prefalign.core.errors import ConfigError
from prefalign.runner import build_config, load_config, method_module

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_builds(path, capsys):
    cfg = load_config(path, None)
    assert hasattr(method_module(cfg.method), "setup")
    assert cfg.train.max_steps >= 1
    assert "deprecated" not in capsys.readouterr().err  # shipped configs use the current keys


@pytest.mark.parametrize(
    "old, check",
    [
        ({"method": "dpo", "model": {"name_or_path": "m"}, "reference": {"strategy": "frozen"}},
         lambda c: c.model.reference.strategy == "frozen"),
        ({"method": "dpo", "model": {"name_or_path": "m"}, "eval_batch_size": 3}, lambda c: c.train.eval_batch_size == 3),
        ({"method": "mpo", "model": {"name_or_path": "m"}, "mpo": {"lam": 0.25, "beta": 2.0}},
         lambda c: c.loss.regularization_weight == 0.25 and c.loss.beta == 2.0),
        ({"method": "em_dpo", "model": {"name_or_path": "m"}, "beta": 0.3, "em": {"iterations": 2}},
         lambda c: c.loss.beta == 0.3 and c.em.max_iterations == 2),
        ({"method": "diffusion_dpo", "model": {"base": "digits", "lora_rank": 4}, "reference": "lora_disabled",
          "data": {"source": "file", "path": "p.npz"}, "beta": 100.0},
         lambda c: (c.model.name_or_path, c.model.lora.enabled, c.model.lora.r, c.model.reference.strategy,
                    c.data.train, c.loss.beta) == ("world:digits", True, 4, "adapter", "p.npz", 100.0)),
        ({"method": "sspo", "model": {"base": "x"}, "data": {"path": "w.npz"}, "objective": "sft"},
         lambda c: c.loss.name == "sft" and c.data.train == "w.npz"),
        ({"method": "sspo", "model": {"base": "x"}, "data": {"path": "w.npz"}, "ssr": "none", "bank": {"size": 3}},
         lambda c: c.loss.ssr == "none" and c.sspo.bank.size == 3),
        ({"method": "pfm", "data": "p.npz", "hidden": 32, "sigma": 0.2, "val_fraction": 0.1},
         lambda c: c.data.train == "p.npz" and c.model.hidden == 32 and c.flow.sigma == 0.2 and c.data.eval_fraction == 0.1),
    ],
)  # fmt: skip
def test_old_keys_move_to_the_new_shape_with_a_message(old, check, capsys):
    cfg = build_config(old)
    assert check(cfg)
    err = capsys.readouterr().err
    assert err.count("deprecated:") >= 1 and "is now" in err


def test_one_knob_one_key_in_every_method():
    """The same key means the same thing everywhere: loss.beta, data.train, model.name_or_path, model.lora.*"""
    for method in ("dpo", "mpo", "em_dpo", "diffusion_dpo", "sspo"):
        cfg = build_config({"method": method, "model": {"name_or_path": "x", "lora": {"r": 4}},
                            "data": {"train": "d"}, "loss": {"beta": 0.5}})  # fmt: skip
        assert (cfg.model.name_or_path, cfg.model.lora.r, cfg.data.train, cfg.loss.beta) == ("x", 4, "d", 0.5)


def test_a_flat_trl_style_key_gets_a_hint():
    with pytest.raises(ConfigError, match=r"model_name_or_path.*did you mean 'model.name_or_path'"):
        build_config({"method": "dpo", "model_name_or_path": "x"})
    with pytest.raises(ConfigError, match=r"did you mean 'train.learning_rate'"):
        build_config({"method": "dpo", "model": {"name_or_path": "x"}, "learning_rate": 1e-5})


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown method 'ppo'"):
        build_config({"method": "ppo"})


@pytest.mark.parametrize("name", sorted(set(method_module("dpo").LOSSES) - {"sft"}))
def test_the_dpo_recipe_takes_every_loss_by_name_alone(name):
    """`--set loss.name=X` on the shipped DPO recipe builds for every preference loss: the recipe sets only
    beta, which they all take (it once set label_smoothing, so `ipo` failed). SFT has no beta: the
    recipe's comment says to add `--set loss.beta=null`."""
    cfg = load_config(CONFIGS[0].with_name("dpo_reviews.yaml"), [f"loss.name={name}"])
    assert cfg.loss.name == name


def test_an_option_the_loss_does_not_take_says_how_to_drop_it(caplog):
    """Options given with --set that the loss does not take: one message naming every key. The recipe's own
    options of another loss are left out with one line when --set switches loss.name (issue 24)."""
    path = CONFIGS[0].with_name("sspo_digits.yaml")  # sets loss.ssr and loss.beta, which `sft` does not take
    with pytest.raises(ConfigError) as caught:  # both keys in one message
        load_config(path, ["loss.name=sft", "loss.beta=1000", "loss.ssr=sign"])
    assert "config key 'loss.beta', 'loss.ssr': loss 'sft' has no option 'beta' or 'ssr'" in str(caught.value)
    assert str(caught.value).endswith("add --set loss.beta=null --set loss.ssr=null")
    assert load_config(path, ["loss.name=sft"]).loss.name == "sft"
    assert "loss.ssr sign" in caplog.text and "loss.beta 2000.0" in caplog.text and "left out" in caplog.text
    assert load_config(path, ["loss.name=sft", "loss.ssr=null", "loss.beta=null"]).loss.name == "sft"
