"""MAE pretraining with the Trainer.

    # the seed's ViT-B/8 on Tiny ImageNet (one GPU), from a config file:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/run_pretrain.py \
        examples/configs/pretrain_mask75_dec8x512.yaml
    # several GPUs (DDP, bf16):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/run_pretrain.py \
        examples/configs/pretrain_mask75_dec8x512.yaml
    # flags instead of a file; a tiny CPU run on the built-in digits:
    python examples/run_pretrain.py --dataset_name digits --preset demo-tiny-32 --output_dir outputs/pt \
        --num_train_epochs 2 --warmup_epochs 1 --per_device_train_batch_size 64
    # a recipe file, then flags that win over it:
    python examples/run_pretrain.py examples/configs/pretrain_mask90.yaml --mask_ratio 0.8 --no_norm_pix_loss
    # your own images (imagefolder layout; --train_val_split of train held out without --validation_dir) or any Hub
    # dataset, with run_mae.py's flags (--dataset_config_name, --config_name, --token, --model_revision, ...):
    python examples/run_pretrain.py --train_dir data/train --train_val_split 0.1 --output_dir outputs/pt ...
    python examples/run_pretrain.py --dataset_name zh-plus/tiny-imagenet --output_dir outputs/pt ...
"""

from hf_mae.cli import pretrain
from hf_mae.training import run_main


def main(argv=None):
    return pretrain(argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
