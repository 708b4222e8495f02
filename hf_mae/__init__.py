"""hf_mae: Masked Autoencoder (MAE) and Distilled MAE pretraining of Vision Transformers, the HuggingFace way."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_dmae import DMAEConfig
from .configuration_mae import PRESETS, MAEConfig
from .image_processing_mae import build_image_processor
from .modeling_dmae import DMAEForPreTraining, DMAEModel
from .modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEPreTrainedModel,
)

__version__ = "0.1.0"

# `import hf_mae` makes the Auto classes know our model types ...
AutoConfig.register(MAEConfig.model_type, MAEConfig)
AutoModel.register(MAEConfig, MAEModel)
AutoModelForPreTraining.register(MAEConfig, MAEForPreTraining)
AutoModelForImageClassification.register(MAEConfig, MAEForImageClassification)
AutoConfig.register(DMAEConfig.model_type, DMAEConfig)
AutoModel.register(DMAEConfig, DMAEModel)
AutoModelForPreTraining.register(DMAEConfig, DMAEForPreTraining)
# ... and every save_pretrained ships the code, with an `auto_map` naming each Auto class the directory fits (see
# `MAEPreTrainedModel._auto_classes`), so `trust_remote_code=True` loads it where hf_mae is not installed.
MAEConfig.register_for_auto_class()
MAEModel.register_for_auto_class("AutoModel")
MAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
DMAEConfig.register_for_auto_class()
DMAEModel.register_for_auto_class("AutoModel")
DMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "PRESETS",
    "MAEConfig",
    "MAEModel",
    "MAEPreTrainedModel",
    "MAEForPreTraining",
    "MAEForImageClassification",
    "DMAEConfig",
    "DMAEModel",
    "DMAEForPreTraining",
    "build_image_processor",
]
