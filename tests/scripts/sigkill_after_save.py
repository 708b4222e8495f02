"""Launched by the resume tests: a training command (`pretrain`, `finetune`, ...) of hf_mae.cli that SIGKILLs itself
right after checkpoint-<step> is complete.

    python tests/scripts/sigkill_after_save.py <command> <step> [flags of the command]
"""

import os
import signal
import sys

from hf_mae.cli import run_command
from hf_mae.training import MAETrainer


def kill_after_checkpoint(step: int) -> None:
    save = MAETrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    MAETrainer._save_checkpoint = save_then_die


if __name__ == "__main__":
    command, step = sys.argv[1], int(sys.argv[2])
    kill_after_checkpoint(step)
    run_command(command, sys.argv[3:])
