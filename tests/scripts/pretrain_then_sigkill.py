"""Launched by tests/test_training.py: examples/run_pretrain.py that SIGKILLs itself right after a checkpoint."""

import os
import signal
import sys

from transformers import TrainerCallback

from hf_mae.training import DataArguments, MAEPretrainingArguments, ModelArguments, parse_args, run_pretraining


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    kill_step = int(sys.argv[1])
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, MAEPretrainingArguments), sys.argv[2:]
    )
    run_pretraining(model_args, data_args, training_args, extra_callbacks=[KillAfterSave(kill_step)])
