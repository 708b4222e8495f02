"""Linear probing of a pretrained MAE / DMAE encoder: frozen encoder, cls token, BatchNorm (no affine) + Linear
head, LARS, blr 0.1, weight decay 0, 90 epochs with 10 warm-up, crop + flip only (the official MAE recipe).

    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/run_linear_probe.py \
        examples/configs/linear_probe.yaml
    python examples/run_linear_probe.py --model_name_or_path outputs/pt --dataset_name digits --output_dir outputs/lp
"""

from hf_mae.cli import linear_probe
from hf_mae.training import run_main


def main(argv=None):
    return linear_probe(argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
