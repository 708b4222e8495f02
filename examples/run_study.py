"""Run the reproduction study (or any grid) end to end: pretraining variants, their fine-tunings, the report.

    # the whole grid on the built-in digits, on CPU, report in outputs/study_demo/report/results.md:
    python examples/run_study.py --scale demo
    # the paper's runs at full scale (Tiny ImageNet, one GPU per run): list them with their exact commands, then run
    python examples/run_study.py --scale full --dry-run
    python examples/run_study.py --scale full
    # every run a Slurm job (pip install "hf_mae[slurm]"): dependencies, the grid's resources, requeue on preemption
    python examples/run_study.py --scale full --executor submitit --resources partition=gpu account=my_account
    # some runs only (glob on run names; the runs they need are added), another grid, the report alone:
    python examples/run_study.py --scale demo --only 'mae_mask*'
    python examples/run_study.py my_grid.yaml --scale full --launcher "accelerate launch --config_file multi_gpu"
    python examples/run_study.py --scale demo --report_only

Rerunning skips finished runs (results.json present) and resumes interrupted ones from their last checkpoint; a
failed run is recorded (outputs/<study>/study_status.json, its log in <run>/study.log) and the study goes on.
This script is `hf-mae study` (= `python -m hf_mae.study`) with the grid `seed` (examples/configs/study_seed.yaml)
as the default.
"""

from hf_mae.study.__main__ import main as study_main
from hf_mae.training import run_main

DEFAULT_GRID = "seed"  # shipped with hf_mae: hf_mae/recipes/study_seed.yaml


def main(argv=None):
    return study_main(argv, default_grid=DEFAULT_GRID)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # errors a user can act on: one message, exit code 1
