"""Every loss of prefalign: pure functions of tensors, per example (unreduced), importing only torch.

Split by family: `lm` (DPO family, listwise Plackett–Luce, SFT), `mpo` (Maximum Preference Optimization,
reconstructed), `diffusion` (Diffusion-DPO, SSPO, SFT on winners), `flow` (flow matching for PFM). Each
function's docstring gives its equation, shapes and source. A loss's options are its parameters with a
scalar default: that is what `loss:` in a config may set (`core.config.build_loss`).
"""

from prefalign.losses.diffusion import diffusion_dpo_loss, diffusion_sft_loss, sspo_loss
from prefalign.losses.flow import flow_matching_loss
from prefalign.losses.lm import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    plackett_luce_loss,
    ranking_log_likelihood,
    robust_dpo_loss,
    sft_loss,
    simpo_loss,
)
from prefalign.losses.mpo import mpo_listwise_loss, mpo_loss, regularization_nll

__all__ = [
    "diffusion_dpo_loss",
    "diffusion_sft_loss",
    "dpo_loss",
    "flow_matching_loss",
    "hinge_loss",
    "ipo_loss",
    "mpo_listwise_loss",
    "mpo_loss",
    "plackett_luce_loss",
    "ranking_log_likelihood",
    "regularization_nll",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
    "sspo_loss",
]
