"""Conditional flow matching (Lipman et al. 2023), the loss of Preference Flow Matching (arXiv 2405.19806).

For a pair (y0 = rejected, y1 = chosen), t ~ U[0, 1] and the path y_t = t·y1 + (1 − t)·y0 + σ·ε, the field
v_θ(t, y_t | x) regresses the target velocity u = y1 − y0.
"""

import torch


def flow_matching_loss(predicted_velocity, target_velocity) -> torch.Tensor:
    """Per-example squared error ||v - u||^2, averaged over the sample's dimensions: shape [N]."""
    return (predicted_velocity - target_velocity).pow(2).flatten(1).mean(1)
