"""Linear probing of a pretrained MAE / DMAE encoder: frozen encoder, cls token, BatchNorm (no affine) + Linear
head, LARS, blr 0.1, weight decay 0, 90 epochs with 10 warm-up, crop + flip only (the official MAE recipe).

    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/run_linear_probe.py \
        examples/configs/linear_probe.yaml
    python examples/run_linear_probe.py --model_name_or_path outputs/pt --dataset_name digits --output_dir outputs/lp
"""

import logging

from hf_mae.training import (
    DataArguments,
    MAELinearProbeArguments,
    ModelArguments,
    parse_args,
    run_finetuning,
    run_main,
)


def main(argv=None):
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, MAELinearProbeArguments), argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    return run_finetuning(model_args, data_args, training_args)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
