"""Distilled MAE (DMAE) pretraining with the Trainer: an MAE student that also matches a frozen teacher's features.

    # the seed's DMAE (ViT-B/8 64 px student, ViT-L/16 MAE teacher to block 18) on Tiny ImageNet, one GPU:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/run_distill.py \
        examples/configs/distill_seed_mask75.yaml
    # the official DMAE variant (linear head, L1 between normalised features), several GPUs (DDP, bf16):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/run_distill.py \
        examples/configs/distill_official_mask75.yaml
    # flags instead of a file; a tiny CPU run on the built-in digits. The teacher can be an hf_mae directory (an MAE,
    # or a DMAE student), a transformers ViTMAE directory, an official MAE .pth or a timm weights file:
    python examples/run_distill.py --dataset_name digits --preset demo-tiny-32 --teacher_path outputs/pt \
        --output_dir outputs/dmae --num_train_epochs 2 --warmup_epochs 1 --per_device_train_batch_size 64
    # then fine-tune the student exactly like an MAE (the saved student holds no teacher; its projector is dropped):
    python examples/run_finetune.py examples/configs/finetune_after_distill_official.yaml

The teacher (--teacher_path, --teacher_layer, --teacher_pos_embed, ...) and the loss (--distill_loss, --distill_weight,
--normalize_features) are training arguments, held by DMAETrainer; --student_layer and --projector set the student's
DMAEConfig.
"""

from hf_mae.cli import distill
from hf_mae.training import run_main


def main(argv=None):
    return distill(argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
