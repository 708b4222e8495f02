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
    # your own images (imagefolder layout) or any Hub dataset:
    python examples/run_pretrain.py --train_dir data/train --validation_dir data/val --output_dir outputs/pt ...
    python examples/run_pretrain.py --dataset_name zh-plus/tiny-imagenet --output_dir outputs/pt ...
"""

import logging

from hf_mae.training import (
    DataArguments,
    KNNArguments,
    KNNMonitor,
    MAEPretrainingArguments,
    ModelArguments,
    parse_args,
    run_main,
    run_pretraining,
)


def main(argv=None):
    model_args, data_args, training_args, knn_args = parse_args(
        (ModelArguments, DataArguments, MAEPretrainingArguments, KNNArguments), argv
    )
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    monitor = KNNMonitor.from_args(knn_args, data_args)  # --knn_eval_steps N logs k-NN top-1 every N steps
    return run_pretraining(model_args, data_args, training_args, extra_callbacks=[monitor] if monitor else None)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
