"""prefalign: align generative models to preferences.

Language models: DPO and variants, listwise Plackett-Luce DPO, MPO, EM-DPO + min-max-regret aggregation.
Black-box generators: Preference Flow Matching. Diffusion: Diffusion-DPO and SSPO.

Layout (each layer imports only the ones before it): `core/` (errors, config, data, log-probs, the training
loop) -> `losses/` (pure torch) -> `methods/` -> `runner` -> `worlds/`, `demos/`, `cli`.
`prefalign.run(cfg)` trains any method's config; see `prefalign.runner`.
"""

from prefalign import _compat

__version__ = "0.2.0"
_compat.install()


def __getattr__(name):
    if name in ("run", "load_config", "evaluate"):  # importing the runner loads torch/transformers: on demand
        from prefalign import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
