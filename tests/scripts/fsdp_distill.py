"""Launched by tests/test_distributed.py: a few deterministic DMAE distillation steps with DMAETrainer, in one process
or under FSDP2 (accelerate_configs/cpu_fsdp2.yaml), all on CPU.

    python tests/scripts/fsdp_distill.py TEACHER_DIR OUT PER_DEVICE_BATCH [--save_steps N]

Each image carries its own mask noise, so a sample is masked the same way whichever process reads it and the
one-process run at the same global batch takes the same steps. Each process writes OUT/rank<i>.json: what it saw of
the student (parameter placements and local shapes, read during the run), of the teacher (DTensor or plain, grad,
mode at every call, membership of the optimizer by identity, its checksum before and after training) and the logged
losses. Process 0 writes OUT/final.pt (the student's full weights, gathered); the run then writes its model card and
saves the student to OUT as the pretraining run does (a gathered plain `save_pretrained` directory)."""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from hf_mae import DMAEConfig, DMAEForPreTraining
from hf_mae.training import DMAETrainer, DMAETrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared tiny config
from helpers import TINY  # noqa: E402

# the shared tiny MAE at 4 blocks (the student of tests/test_dmae.py), for a 128-wide teacher
STUDENT = dict(TINY, num_hidden_layers=4, norm_pix_loss=True, teacher_hidden_size=128)


class FixedWithNoise(Dataset):
    """Images with their own mask noise: the mask follows the sample, not the process or its place in a batch."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.noise = torch.rand(n, 16, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "noise": self.noise[i]}


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def teacher_checksum(teacher: torch.nn.Module) -> float:
    return float(sum(t.double().sum() for t in teacher.state_dict().values()))


class Reporter(TrainerCallback):
    """Records, from inside the run, the student as it trains and the teacher next to it."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher, self.report = teacher, {}
        self.teacher_calls: list[dict] = []
        teacher.register_forward_pre_hook(self._on_teacher_call)

    def _on_teacher_call(self, module, args):
        self.teacher_calls.append(
            {
                "training": any(m.training for m in module.modules()),
                "dtensor": any(is_dtensor(p) for p in module.parameters()),
                "grad_enabled": torch.is_grad_enabled(),
            }
        )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.report:
            return
        from torch.distributed.fsdp import FSDPModule

        optimized = [p for group in optimizer.param_groups for p in group["params"]]
        optimized_ids = {id(p) for p in optimized}
        teacher_params = list(self.teacher.parameters())
        self.report = {
            "student_class": type(model).__name__,
            "student_fsdp_module": isinstance(model, FSDPModule),
            "student_placements": {
                name: [repr(p) for p in getattr(param, "placements", ())] for name, param in model.named_parameters()
            },
            "student_local_shapes": {
                name: list(param.to_local().shape if is_dtensor(param) else param.shape)
                for name, param in model.named_parameters()
            },
            "optimizer_is_the_student": optimized_ids == {id(p) for p in model.parameters() if p.requires_grad},
            "teacher_in_optimizer": sum(id(p) in optimized_ids for p in teacher_params),
            "teacher_in_student": sum(any(p is q for q in model.parameters()) for p in teacher_params),
            "teacher_modules_in_student": sum(any(m is s for s in model.modules()) for m in self.teacher.modules()),
            "teacher_dtensors": sum(is_dtensor(p) for p in teacher_params),
            "teacher_requires_grad": sum(p.requires_grad for p in teacher_params),
            "teacher_devices": sorted({str(p.device) for p in teacher_params}),
            "teacher_dtypes": sorted({str(p.dtype) for p in teacher_params}),
            "teacher_parameters": len(teacher_params),
        }


def main(teacher_dir: str, out: str, per_device_batch: int, save_steps: int):
    torch.manual_seed(0)
    student = DMAEForPreTraining(DMAEConfig(**STUDENT))
    args = DMAETrainingArguments(
        output_dir=out,
        teacher_path=teacher_dir,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        max_steps=4,
        warmup_steps=1,
        base_learning_rate=None,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
    )
    trainer = DMAETrainer(
        model=student, args=args, train_dataset=FixedWithNoise(), eval_dataset=FixedWithNoise(16, seed=1)
    )
    teacher = trainer.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    checksum_before = teacher_checksum(teacher)
    reporter = Reporter(teacher)
    trainer.add_callback(reporter)
    trainer.train()
    metrics = trainer.evaluate()

    rank = trainer.args.process_index
    state = trainer.accelerator.get_state_dict(trainer.model)  # the student's full weights; a collective under FSDP
    if trainer.is_world_process_zero():
        torch.save(state, Path(out) / "final.pt")
    trainer.create_model_card()
    trainer.save_model()  # as run_pretraining ends: gathered into a plain save_pretrained directory
    after = teacher.state_dict()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": trainer.args.world_size,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "steps": trainer.state.global_step,
                "logs": [e for e in trainer.state.log_history if "loss" in e],
                "eval": {k: v for k, v in metrics.items() if k.endswith("_loss")},
                "teacher_calls": reporter.teacher_calls,
                "teacher_training_after": teacher.training,
                "teacher_unchanged": after.keys() == before.keys()
                and all(torch.equal(after[k], before[k]) for k in before),
                "teacher_grads": sum(p.grad is not None for p in teacher.parameters()),
                "teacher_checksum_before": checksum_before,
                "teacher_checksum_after": teacher_checksum(teacher),
                **reporter.report,
            }
        )
    )
    # a clean gloo shutdown: exiting with the process group alive can abort a rank ("terminate called without an
    # active exception") after all the work is done
    trainer.accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher_dir")
    parser.add_argument("out")
    parser.add_argument("per_device_batch", type=int)
    parser.add_argument("--save_steps", type=int, default=0)
    cli = parser.parse_args()
    main(cli.teacher_dir, cli.out, cli.per_device_batch, cli.save_steps)
