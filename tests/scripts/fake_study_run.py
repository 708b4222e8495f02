"""A study run that pretends to train, as a real process and without importing hf_mae (tests/test_submitit.py): the
study's launcher is `python fake_study_run.py`, so it receives `-m hf_mae.study KIND --flags`.

- `--fake_fail true`: exits 1.
- `--fake_hold true` (and no `--resume_from_checkpoint`): writes a complete checkpoint-3, then `held.json` with its
  parent's pid (the submitit task), and sleeps until it is stopped: the test preempts it.
- `--resume_from_checkpoint latest`: the newest complete checkpoint is resumed; results.json says which.
Otherwise it writes results.json (and a log history the report reads) and exits 0.
"""

import json
import os
import struct
import sys
import time
from pathlib import Path


def flags(argv):
    values, key = {}, None
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:]
            values[key] = "true"
        elif key is not None:
            values[key] = arg
            key = None
    return values


def write_checkpoint(path: Path, step: int) -> None:
    """What a completed Trainer save leaves (for hf_mae's completeness check): safetensors weights, then
    trainer_state.json; written by hand, since this script must start fast (no torch)."""
    path.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 0.0))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def newest_complete(output_dir: Path):
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def main():
    kind = sys.argv[sys.argv.index("hf_mae.study") + 1]
    args = flags(sys.argv[1:])
    out = Path(args["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    print(f"{kind} into {out} with {args}", flush=True)
    if args.get("fake_fail") == "true":
        print("Traceback ...\nValueError: this run was told to fail", flush=True)
        return 1
    resumed = None
    if "resume_from_checkpoint" in args:
        checkpoint = newest_complete(out)
        if checkpoint is None:
            print(f"ValueError: --resume_from_checkpoint latest: no complete checkpoint-* in {out}", flush=True)
            return 1
        resumed = checkpoint.name
    elif args.get("fake_hold") == "true":
        write_checkpoint(out / "checkpoint-3", 3)
        (out / "checkpoint-5").mkdir()  # half-written: never resumed from
        (out / "held.json").write_text(json.dumps({"task_pid": os.getppid()}))
        time.sleep(300)
        return 3
    top1 = 50.0 + len(out.name)
    results = {"eval_loss": 0.5, "resumed_from": resumed}
    if kind == "finetune":
        results.update(top1=top1, best_top1=top1 + 1)
    history = [{"loss": 2.0 - e / 10, "epoch": e, "step": e} for e in range(1, 4)]
    (out / "log_history.json").write_text(json.dumps(history))
    (out / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
