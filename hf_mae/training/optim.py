"""Optimizer parameter groups: weight decay only on matrices, optional layer-wise lr decay (timm's helpers)."""

from __future__ import annotations

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

# Parameters never decayed in fine-tuning (official MAE: `no_weight_decay()` of the ViT); 1-D tensors and biases
# are excluded by timm's helpers themselves.
NO_WEIGHT_DECAY = ("mae.pos_embed", "mae.cls_token", "decoder.mask_token", "decoder.pos_embed")


def param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    no_weight_decay: tuple[str, ...] | None = None,
) -> list[dict]:
    """AdamW parameter groups as the official MAE builds them, each with its absolute `lr`.

    Without `layer_decay` (pretraining): decay everything but 1-D tensors and biases (MAE decays cls/mask tokens in
    pretraining). With `layer_decay` (fine-tuning): group `i` gets `lr * layer_decay ** (num_layers + 1 - i)` and
    pos/cls embeddings are not decayed either. Layers come from the model's timm-style `group_matcher`.
    Frozen parameters are left out.
    """
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay or ())
    else:
        groups = param_groups_layer_decay(
            model,
            weight_decay=weight_decay,
            no_weight_decay_list=NO_WEIGHT_DECAY if no_weight_decay is None else no_weight_decay,
            layer_decay=layer_decay,
        )
    for group in groups:
        group["lr"] = learning_rate * group.pop("lr_scale", 1.0)
        group["params"] = [p for p in group["params"] if p.requires_grad]
    return [g for g in groups if g["params"]]
