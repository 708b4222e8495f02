"""The shipped accelerate configs parse with accelerate's own loader and do what their names say."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {"cpu_2proc", "cpu_fsdp2", "single_gpu", "multi_gpu", "multi_node", "fsdp2", "deepspeed_zero2"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_accelerate(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert config.mixed_precision in ("no", "bf16", "fp16")


def test_deepspeed_does_not_clip_gradients():
    # the official MAE / DMAE recipes never clip; max_grad_norm defaults to 0 in every MAETrainingArguments
    config = load_config_from_file(str(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml"))
    assert not config.deepspeed_config.get("gradient_clipping")


def test_cpu_fsdp2_is_the_gpu_recipe_on_two_cpu_processes():
    # what the tests exercise on CPU is what fsdp2.yaml runs on GPUs: the same FSDP settings
    gpu = load_config_from_file(str(ROOT / "accelerate_configs" / "fsdp2.yaml"))
    cpu = load_config_from_file(str(ROOT / "accelerate_configs" / "cpu_fsdp2.yaml"))
    assert gpu.fsdp_config == cpu.fsdp_config and gpu.fsdp_config["fsdp_version"] == 2
    assert gpu.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "MAEBlock"
    assert cpu.distributed_type == gpu.distributed_type and cpu.use_cpu and cpu.num_processes == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cpu_2proc_starts_one_world_of_two_without_env_var(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "scripts" / "report_world.py"), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    worlds = sorted(path.read_text().split() for path in tmp_path.glob("rank*.txt"))
    assert worlds == [["0", "2", "gloo"], ["1", "2", "gloo"]], result.stdout
