"""Fine-tune a pretrained MAE / DMAE encoder for image classification (or train the same ViT from scratch).

    # the seed's full-augmentation fine-tuning of a pretrained ViT-B/8:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/run_finetune.py \
        examples/configs/finetune_full.yaml --model_name_or_path outputs/pretrain_mask75_dec8x512
    # small augmentation (no Mixup / CutMix / label smoothing), flags only:
    python examples/run_finetune.py --model_name_or_path outputs/pt --finetune_aug small --output_dir outputs/ft
    # run_image_classification.py's flags: a Hub model and dataset at a revision, another image processor:
    python examples/run_finetune.py --model_name_or_path user/mae-b8 --model_revision v1 --token hf_... \
        --dataset_name user/pets --dataset_config_name v2 --train_val_split 0.1 --image_processor_name user/proc ...
    # from-scratch baseline (no --model_name_or_path):
    python examples/run_finetune.py --preset seed-vit-b8-64 --output_dir outputs/scratch ...
    # 2 CPU processes (gloo), see accelerate_configs/cpu_2proc.yaml:
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/run_finetune.py ...
"""

from hf_mae.cli import finetune
from hf_mae.training import run_main


def main(argv=None):
    return finetune(argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
