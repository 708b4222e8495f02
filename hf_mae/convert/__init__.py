"""Convert MAE checkpoints between hf_mae and the official MAE code, timm and transformers' ViTMAE.

Into hf_mae (the output is a `save_pretrained` directory that `from_pretrained` / `AutoModel` load after `import hf_mae`):

    python -m hf_mae.convert --source official mae_pretrain_vit_base.pth out/mae-vit-base --norm_pix_loss
    python -m hf_mae.convert --source timm vit_small_patch16_224.safetensors out/vit-small
    python -m hf_mae.convert --source transformers path/to/vit-mae-base out/mae-vit-base --image_size 128

Out of hf_mae:

    python -m hf_mae.convert --target transformers out/mae-vit-base out/vit-mae-base   # ViTMAEForPreTraining dir
    python -m hf_mae.convert --target timm out/mae-finetuned vit_finetuned.safetensors # or .pth
    python -m hf_mae.convert --target official out/mae-vit-base mae_vit_base.pth       # {"model": state_dict}

What the weights decide (widths, depths, patch size, channels, MLP ratios, qkv bias, which heads exist) is read from
the tensors and cannot be overridden; what they cannot tell (attention heads, mask ratio, `norm_pix_loss`) comes from
the flags, a `--preset`, the `args` saved in an official training checkpoint, or defaults: heads from the ViT table
{192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16} (width // 64 otherwise; the MAE decoder's 512 gets its 16), LayerNorm
eps 1e-6. Every conversion logs the heads and `norm_pix_loss` it used and where each came from, a warning when one
was assumed. A different `--image_size` resizes the position tables (bicubic, `interpolate_pos_embed`).

Every conversion is strict: a missing, unexpected or wrong-shape tensor raises `ValueError` naming the keys, in the
source's own names where it has them. Nothing is ever loaded partially.

Modules: `common` (reading files, config inference, strict loading), one per foreign format (`official`: the
official MAE code and timm, which share the ViT key layout; `vitmae`: transformers), `loading` (hf_mae directories,
format detection, `load_encoder`) and the CLI in `__main__`.
"""

from .common import (
    DEFAULT_DECODER_NUM_HEADS,
    DEFAULT_NUM_HEADS,
    PathLike,
    StateDict,
    default_num_heads,
    load_checkpoint_file,
)
from .loading import (
    CHECKPOINT_KINDS,
    CHECKPOINT_SUFFIXES,
    SOURCES,
    TARGETS,
    detect_checkpoint_kind,
    load_encoder,
    load_hf_mae_model,
)
from .official import (
    convert_official_checkpoint,
    convert_timm_state_dict,
    timm_model_kwargs,
    to_official_state_dict,
    to_timm_state_dict,
)
from .vitmae import convert_transformers_model, to_transformers

__all__ = [
    "CHECKPOINT_KINDS",
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_DECODER_NUM_HEADS",
    "DEFAULT_NUM_HEADS",
    "SOURCES",
    "TARGETS",
    "PathLike",
    "StateDict",
    "convert_official_checkpoint",
    "convert_timm_state_dict",
    "convert_transformers_model",
    "default_num_heads",
    "detect_checkpoint_kind",
    "load_checkpoint_file",
    "load_encoder",
    "load_hf_mae_model",
    "timm_model_kwargs",
    "to_official_state_dict",
    "to_timm_state_dict",
    "to_transformers",
]
