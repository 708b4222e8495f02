"""Every multi-process mode hf_mae advertises, exercised on CPU: two "machines" over loopback, FSDP2 really sharding
(and resuming from its sharded checkpoint; with the DMAE teacher replicated beside the sharded student, only run),
the refusals when sharding cannot be applied, and streamed data read by each process from its own files.

The training runs launch tests/scripts/ddp_finetune.py (4 deterministic fine-tuning steps, the third one's loss NaN
on one process) and tests/scripts/fsdp_distill.py (4 DMAE steps, each image with its own mask) and compare with one
process at the same global batch; the streaming run launches tests/scripts/stream_ids.py, which records the ids of
the samples each process trained on."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_config

from hf_mae import DMAEConfig, DMAEForPreTraining, MAEConfig, MAEForImageClassification, MAEForPreTraining
from hf_mae.training import DMAETrainer, DMAETrainingArguments, MAEFinetuningArguments, MAETrainer, run_main
from hf_mae.training.fsdp import load_sharded_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "scripts" / "ddp_finetune.py")
DISTILL_SCRIPT = str(ROOT / "tests" / "scripts" / "fsdp_distill.py")
CONFIGS = ROOT / "accelerate_configs"
# no ACCELERATE_USE_CPU: hf_mae's arguments must find out by themselves that the ranks have no GPU
ENV = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
ENV.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
TEARDOWN_ABORT = "terminate called without an active exception"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_args(config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *extra]


def _check_finished(results: list[subprocess.CompletedProcess], out: Path, ranks: int) -> list[dict]:
    """The ranks' reports; gloo sometimes aborts a rank while tearing down after all work is written ("terminate
    called without an active exception"): that is not a training failure, anything else is."""
    finished = all((out / f"rank{r}.json").exists() for r in range(ranks)) and (out / "final.pt").exists()
    for result in results:
        assert result.returncode == 0 or (finished and TEARDOWN_ABORT in result.stderr), result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def _assert_same_weights(a: Path, b: Path, atol: float, skip_key_bias: bool = False) -> None:
    one, two = torch.load(a), torch.load(b)
    assert one.keys() == two.keys()
    for key in one:
        x, y = one[key], two[key]
        if skip_key_bias and key.endswith("attn.qkv.bias"):
            # the key bias adds the same q . b_k to every logit of a softmax row, so its gradient is zero in exact
            # arithmetic: what each run computes is rounding noise of its own reduction order, which AdamW
            # normalises into updates of any sign; the query and value thirds are compared
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        assert torch.allclose(x, y, atol=atol), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, global batch 16, its loss NaN at the third step."""
    out = tmp_path_factory.mktemp("one")
    result = subprocess.run(
        [sys.executable, SCRIPT, str(out), "16", "0"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """FSDP2 over two CPU processes, 8 images each, the NaN on rank 1 only, a sharded checkpoint at step 2."""
    out = tmp_path_factory.mktemp("fsdp")
    command = _launch_args("cpu_fsdp2.yaml", "--main_process_port", str(_free_port()))
    command += [SCRIPT, str(out), "8", "1", "--save_steps", "2"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    _check_finished([result], out, 2)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny MAE saved with save_pretrained to teach the DMAE runs: 48 px, patch 8, 128 wide, 4 blocks."""
    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    config = MAEConfig(
        image_size=48, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=1,
    )  # fmt: skip
    MAEForPreTraining(config).save_pretrained(path)
    return path


# -- two machines --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_machines_match_one_process_at_same_global_batch(tmp_path, one_process):
    # what each node of accelerate_configs/multi_node.yaml runs, over loopback: one process per "machine", gloo
    out, port = tmp_path / "two_machines", str(_free_port())
    nodes = []
    for machine_rank in (0, 1):
        command = _launch_args(
            "cpu_2proc.yaml", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        )  # fmt: skip
        command += [SCRIPT, str(out), "8", "1"]
        nodes.append(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=600)
        finally:
            node.kill()
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    ranks = _check_finished(results, out, 2)
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" and r["steps"] == 4 for r in ranks)
    assert [r["skipped"] for r in ranks] == [1, 1]  # the NaN on machine 1 skipped the step on machine 0 too
    single = json.loads((one_process / "rank0.json").read_text())
    for step in (0, 1, 3):
        assert ranks[0]["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5)
    _assert_same_weights(one_process / "final.pt", out / "final.pt", atol=1e-5)


# -- FSDP2 ---------------------------------------------------------------------------------------------------------


def test_fsdp2_on_cpu_really_shards_and_saves_a_plain_model(fsdp_run):
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = torch.load(fsdp_run / "final.pt")
    for report in ranks:
        assert report["distributed_type"] == "DistributedType.FSDP" and report["fsdp_module"]
        blocks = {name: p for name, p in report["placements"].items() if name.startswith("mae.blocks.")}
        assert blocks and all(p == ["Shard(dim=0)"] for p in blocks.values()), blocks
        for name in blocks:  # each process holds its half of every block parameter, read during the run
            rows = full[name].shape[0]
            assert report["local_shapes"][name][0] == [-(-rows // 2), rows // 2][report["rank"]], name
        assert report["steps"] == 4 and report["skipped"] == 1  # the guard worked on sharded (DTensor) gradients
        assert report["refused_nan_save"]  # a NaN in rank 1's shard stopped save_model on both processes
    assert not (fsdp_run / "nan_model" / "model.safetensors").exists()
    checkpoint = fsdp_run / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not list(checkpoint.glob("*.safetensors"))  # sharded, as fsdp_state_dict_type says
    # the final model is a plain save_pretrained directory, not FSDP's generated class or torch's FSDP sources
    saved = fsdp_run / "model"
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["NaNAtStep"]
    assert not list(saved.glob("_fsdp*.py"))
    loaded = MAEForImageClassification.from_pretrained(saved).state_dict()
    assert loaded.keys() == full.keys()
    for key in full:
        assert torch.equal(loaded[key], full[key]), key


@pytest.mark.slow
def test_fsdp2_matches_one_process(fsdp_run, one_process):
    # and so DDP, which tests/test_training.py holds to the same reference
    sharded = json.loads((fsdp_run / "rank0.json").read_text())
    single = json.loads((one_process / "rank0.json").read_text())
    for step in (0, 1, 3):
        assert sharded["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5)
    _assert_same_weights(one_process / "final.pt", fsdp_run / "final.pt", atol=1e-5)


@pytest.mark.slow
def test_fsdp2_resumes_from_its_sharded_checkpoint(tmp_path, fsdp_run):
    out = tmp_path / "resumed"
    command = _launch_args("cpu_fsdp2.yaml", "--main_process_port", str(_free_port()))
    command += [SCRIPT, str(out), "8", "1", "--resume", str(fsdp_run / "checkpoint-2")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    ranks = _check_finished([result], out, 2)
    assert all(r["first_step"] == 2 and r["steps"] == 4 for r in ranks)  # it continued, it did not start over
    _assert_same_weights(fsdp_run / "final.pt", out / "final.pt", atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["pretrain", "distill"])
def test_fsdp2_pretraining_run_end_to_end(tmp_path, example, teacher_dir):
    # the example as a user launches it: evaluation, reconstructions (a forward on every process), model card, the
    # final model gathered into a plain directory; then `--resume_from_checkpoint latest` finds the sharded one (a
    # DMAE student resumes with its teacher loaded again from --teacher_path: checkpoints hold the student alone)
    out = tmp_path / example
    flags = [
        str(ROOT / "examples" / f"run_{example}.py"), "--dataset_name", "digits", "--preset", "demo-tiny-32",
        "--output_dir", str(out), "--per_device_train_batch_size", "8", "--warmup_steps", "1", "--save_steps", "2",
        "--logging_steps", "1", "--report_to", "none", "--max_eval_samples", "16", "--num_reconstructions", "2",
    ]  # fmt: skip
    if example == "distill":
        flags += ["--teacher_path", str(teacher_dir)]
    for extra in (["--max_steps", "4"], ["--max_steps", "6", "--resume_from_checkpoint", "latest"]):
        command = _launch_args("cpu_fsdp2.yaml", "--main_process_port", str(_free_port())) + flags + extra
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
        finished = (out / "results.json").exists()
        assert result.returncode == 0 or (finished and TEARDOWN_ABORT in result.stderr), result.stderr[-4000:]
    assert "resuming from" in result.stderr and "checkpoint-4" in result.stderr
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert (out / "checkpoint-6" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (out / "reconstructions.png").is_file() and (out / "README.md").is_file()
    model = (DMAEForPreTraining if example == "distill" else MAEForPreTraining).from_pretrained(out)
    assert model.config.image_size == 32 and torch.isfinite(model.mae.patch_embed.proj.weight).all()
    if example == "distill":
        assert {k.split(".")[0] for k in model.state_dict()} == {"mae", "decoder", "projector"}
        sharded = load_sharded_model(out / "checkpoint-6" / "pytorch_model_fsdp_0")
        assert sharded.keys() == model.state_dict().keys()
        logs = [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
        assert len(logs) == 6 and all(e["distillation_loss"] > 0 for e in logs)
        assert "## Distillation" in (out / "README.md").read_text()


def test_an_entry_point_ends_the_process_group(tmp_path):
    # left to the interpreter's exit, gloo's threads abort some finished ranks ("terminate called without an active
    # exception", exit code -6), which fails the launch and a study's run after all their work is written
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert run_main(lambda: None) == 0
        assert not torch.distributed.is_initialized()
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        assert run_main(lambda: (_ for _ in ()).throw(ValueError("bad value"))) == 1  # also after a user error
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_fsdp_requested_on_a_single_process_is_refused(tmp_path, monkeypatch):
    # what `accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 1` hands a CPU process:
    # accelerate sets up no FSDP for it and would train unsharded; hf_mae refuses
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = MAEFinetuningArguments(output_dir=str(tmp_path), report_to="none", max_steps=1)
    with pytest.raises(ValueError, match="FSDP was requested .* unsharded model"):
        MAETrainer(model=MAEForImageClassification(tiny_config(num_labels=2)), args=args)


def test_check_model_sharded_refuses_a_plain_model():
    from hf_mae.training.fsdp import check_model_sharded

    with pytest.raises(ValueError, match="refusing to train it unsharded"):
        check_model_sharded(torch.nn.Linear(2, 2), fsdp_version=2)


def test_a_sharded_checkpoint_is_complete_only_with_its_metadata(tmp_path):
    from hf_mae.training.trainer import incomplete_reason

    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "pytorch_model_fsdp_0").mkdir(parents=True)
    (checkpoint / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert ".metadata" in incomplete_reason(checkpoint)  # a kill during the sharded save
    (checkpoint / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"written last")
    assert incomplete_reason(checkpoint) is None


# -- FSDP2 with the DMAE teacher -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_distill_run(tmp_path_factory, teacher_dir) -> Path:
    """DMAE under FSDP2 over two CPU processes, 8 images each, a sharded checkpoint at step 2."""
    out = tmp_path_factory.mktemp("fsdp_distill")
    command = _launch_args("cpu_fsdp2.yaml", "--main_process_port", str(_free_port()))
    command += [DISTILL_SCRIPT, str(teacher_dir), str(out), "8", "--save_steps", "2"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    _check_finished([result], out, 2)
    return out


def test_fsdp2_distillation_shards_the_student_and_only_runs_the_teacher(fsdp_distill_run):
    ranks = [json.loads((fsdp_distill_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = torch.load(fsdp_distill_run / "final.pt")
    for report in ranks:
        assert report["distributed_type"] == "DistributedType.FSDP" and report["student_fsdp_module"]
        assert report["steps"] == 4
        # the student: every parameter a DTensor, each process holding its half of it
        placements = report["student_placements"]
        assert placements.keys() == full.keys() and all(p == ["Shard(dim=0)"] for p in placements.values())
        for name, shape in report["student_local_shapes"].items():
            rows = full[name].shape[0]
            assert shape[0] == [-(-rows // 2), rows // 2][report["rank"]], name
        assert report["optimizer_is_the_student"]  # the optimizer holds the student's DTensors and nothing else
        # the teacher: whole plain tensors on every process, frozen, outside the student and its optimizer
        assert report["teacher_parameters"] > 0 and report["teacher_dtensors"] == 0
        assert report["teacher_requires_grad"] == 0 and report["teacher_grads"] == 0
        assert report["teacher_in_optimizer"] == report["teacher_in_student"] == 0
        assert report["teacher_modules_in_student"] == 0
        assert report["teacher_devices"] == ["cpu"] and report["teacher_dtypes"] == ["torch.float32"]
        # run in eval mode without grad at every call (4 training steps, 1 evaluation batch), never trained
        calls = report["teacher_calls"]
        assert len(calls) == 5 and not any(c["training"] or c["dtensor"] or c["grad_enabled"] for c in calls)
        assert not report["teacher_training_after"] and report["teacher_unchanged"]
        assert report["teacher_checksum_after"] == report["teacher_checksum_before"]
        assert all(e["reconstruction_loss"] > 0 and e["distillation_loss"] > 0 for e in report["logs"])
    assert ranks[0]["teacher_checksum_before"] == ranks[1]["teacher_checksum_before"]  # the same teacher on each
    assert ranks[0]["logs"] == ranks[1]["logs"]  # the loss parts are reduced over the processes
    # the checkpoint: the student's shards alone
    checkpoint = fsdp_distill_run / "checkpoint-2"
    assert not list(checkpoint.glob("*.safetensors"))
    assert load_sharded_model(checkpoint / "pytorch_model_fsdp_0").keys() == full.keys()
    # the final model: a plain DMAE student gathered from the shards, no teacher keys, the distillation in its card
    out = fsdp_distill_run
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DMAEForPreTraining"]
    assert not list(out.glob("_fsdp*.py"))
    loaded = DMAEForPreTraining.from_pretrained(out).state_dict()
    assert {k.split(".")[0] for k in loaded} == {"mae", "decoder", "projector"} and loaded.keys() == full.keys()
    for key in full:
        assert torch.equal(loaded[key], full[key]), key
    card = (out / "README.md").read_text()
    assert (
        "## Distillation" in card and "| teacher_layer | 3 of 4 |" in card and "| teacher_hidden_size | 128 |" in card
    )


@pytest.mark.slow
def test_fsdp2_distillation_matches_one_process(tmp_path, fsdp_distill_run, teacher_dir):
    out = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, DISTILL_SCRIPT, str(teacher_dir), str(out), "16"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    single = json.loads((out / "rank0.json").read_text())
    sharded = json.loads((fsdp_distill_run / "rank0.json").read_text())
    assert single["teacher_checksum_before"] == sharded["teacher_checksum_before"]
    assert len(sharded["logs"]) == len(single["logs"]) == 4
    for got, want in zip(sharded["logs"], single["logs"]):  # each part averaged over both processes' images
        for key in ("loss", "reconstruction_loss", "distillation_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    for key, value in single["eval"].items():
        assert sharded["eval"][key] == pytest.approx(value, rel=1e-5), key
    _assert_same_weights(out / "final.pt", fsdp_distill_run / "final.pt", atol=1e-5, skip_key_bias=True)


def test_dmae_teacher_takes_the_precision_of_the_launch_config(tmp_path, monkeypatch, teacher_dir):
    # what `accelerate launch --config_file accelerate_configs/fsdp2.yaml` (mixed_precision: bf16) hands a process
    # run without --bf16: the teacher computes in bf16 like the student, not in fp32 at twice the memory
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = DMAETrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    assert not args.bf16
    student = DMAEForPreTraining(DMAEConfig(**TINY, teacher_hidden_size=128))
    trainer = DMAETrainer(model=student, args=args, teacher=teacher_dir)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}


# -- streaming -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    """4 train files of 10 images (ids 0-39) and a validation file of 6 (ids 100-105), columns `image` and `id`."""
    import io

    from datasets import Dataset
    from PIL import Image

    folder = tmp_path_factory.mktemp("parquet")
    g = torch.Generator().manual_seed(0)

    def image() -> dict:
        buffer = io.BytesIO()
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    files = [(f"train-{i:05d}-of-00004.parquet", range(10 * i, 10 * i + 10)) for i in range(4)]
    files.append(("validation-00000-of-00001.parquet", range(100, 106)))
    for name, ids in files:
        Dataset.from_dict({"image": [image() for _ in ids], "id": list(ids)}).to_parquet(folder / name)
    return folder


def test_streaming_needs_step_counts_and_reads_per_process(tmp_path):
    from hf_mae.data.streaming import prepare_training_for_stream
    from hf_mae.training import MAEPretrainingArguments

    def args(**kwargs):
        return MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)

    with pytest.raises(ValueError, match="--max_steps"):
        prepare_training_for_stream(args(warmup_steps=1))  # epochs only
    with pytest.raises(ValueError, match="warmup_epochs=40 .* --warmup_steps"):
        prepare_training_for_stream(args(max_steps=10))  # the recipe's warm-up in epochs
    with pytest.raises(ValueError, match="eval_strategy=epoch"):
        prepare_training_for_stream(args(max_steps=10, warmup_steps=1, eval_strategy="epoch"))
    with pytest.raises(ValueError, match="save_strategy=epoch"):
        prepare_training_for_stream(args(max_steps=10, warmup_steps=1, save_strategy="epoch"))
    ready = args(max_steps=10, warmup_steps=1)
    prepare_training_for_stream(ready)
    assert ready.accelerator_config.dispatch_batches is False  # each process reads its own files


def test_streaming_load_data_shuffles_transforms_and_reads_validation_once(parquet_folder):
    from datasets import Dataset, IterableDataset

    from hf_mae.data import apply_transform, build_pretrain_transform
    from hf_mae.training import DataArguments
    from hf_mae.training.pipeline import load_data

    data_args = DataArguments(
        dataset_name=str(parquet_folder), streaming=True, label_column_name="id", max_eval_samples=4
    )
    ds = load_data(data_args, image_size=16, seed=0)
    assert isinstance(ds["train"], IterableDataset) and isinstance(ds["validation"], Dataset)
    assert sorted(ds["validation"]["label"]) == [100, 101, 102, 103]  # the first --max_eval_samples, kept on disk
    train = apply_transform(ds["train"], build_pretrain_transform(16))  # the recipe's own transform
    epochs = []
    for epoch in (0, 1):
        train.set_epoch(epoch)  # what the Trainer does each epoch
        examples = list(train)
        assert all(tuple(e["pixel_values"].shape) == (3, 16, 16) for e in examples)
        epochs.append([e["label"] for e in examples])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(40))  # shuffled, and again each epoch
    limited = load_data(DataArguments(**{**data_args.__dict__, "max_train_samples": 12}), image_size=16, seed=0)
    assert len(list(limited["train"])) == 12


def test_streaming_warns_when_the_processes_would_read_unequal_parts(parquet_folder, monkeypatch, caplog):
    # 4 files: an even share for 2 or 4 processes; over 3, one process reads 2 files and the others 1, and each
    # cycles through its own, so the examples of the latter would be trained on twice as often
    from types import SimpleNamespace

    from hf_mae.training import DataArguments, pipeline

    data_args = DataArguments(dataset_name=str(parquet_folder), streaming=True, label_column_name="id")
    for processes in (2, 3, 4):
        monkeypatch.setattr(
            pipeline, "PartialState", lambda n=processes: SimpleNamespace(num_processes=n), raising=False
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_mae.data.streaming"):
            pipeline.load_data(data_args, image_size=16, seed=0)
        warned = [r.getMessage() for r in caplog.records if "shards" in r.getMessage()]
        if processes == 3:
            assert warned == [
                "--streaming: 4 shards (files, or parquet row groups) over 3 processes: some processes read 2, others "
                "1, so the examples of the latter are trained on 2x as often; write a multiple of 3 files"
            ]
        else:
            assert not warned


def test_streaming_refuses_what_it_cannot_stream(tmp_path, parquet_folder):
    from hf_mae.training import DataArguments, MAEPretrainingArguments, ModelArguments, run_finetuning, run_pretraining
    from hf_mae.training.pipeline import knn_datasets, load_data

    for bad in (dict(dataset_name="digits"), dict(device_data=True), dict(train_dir="images/")):
        with pytest.raises(ValueError, match="--streaming"):
            load_data(DataArguments(**{"dataset_name": str(parquet_folder), **bad, "streaming": True}), 16)
    with pytest.raises(ValueError, match="k-NN monitor"):
        knn_datasets(DataArguments(dataset_name=str(parquet_folder), streaming=True))(16, 0)
    with pytest.raises(ValueError, match="--max_steps"):  # the runs check the arguments before reading anything
        run_pretraining(
            ModelArguments(preset="demo-tiny-32"),
            DataArguments(dataset_name=str(parquet_folder), streaming=True),
            MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none"),
        )
    # plain integer ids are no classes to fine-tune on
    args = MAEFinetuningArguments(output_dir=str(tmp_path), report_to="none", max_steps=2, warmup_steps=1)
    data_args = DataArguments(dataset_name=str(parquet_folder), streaming=True, label_column_name="id")
    with pytest.raises(ValueError, match="ClassLabel"):
        run_finetuning(ModelArguments(preset="demo-tiny-32"), data_args, args)


@pytest.mark.slow
def test_streaming_two_processes_read_distinct_files_covering_the_split(tmp_path, parquet_folder):
    out = tmp_path / "stream"
    command = _launch_args("cpu_2proc.yaml", "--main_process_port", str(_free_port()))
    # 12 steps of 4 per process: two passes over each process's 20 images (its 2 files, one per loader worker)
    command += [str(ROOT / "tests" / "scripts" / "stream_ids.py"), str(parquet_folder), str(out), "12", "4"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    finished = all((out / f"rank{r}.json").exists() for r in (0, 1))
    assert result.returncode == 0 or (finished and TEARDOWN_ABORT in result.stderr), result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen = [[i for batch in r["batches"] for i in batch] for r in ranks]
    assert all(len(ids) == 40 for ids in seen)
    first, second = [ids[:20] for ids in seen], [ids[20:] for ids in seen]
    for rank in (0, 1):
        assert len(set(first[rank])) == 20  # one pass: every image of its share once
        assert sorted(second[rank]) == sorted(first[rank]) and second[rank] != first[rank]  # reshuffled by set_epoch
    # each process read its own files (2 of the 4), not slices of batches that process 0 read from all of them
    files = [{i // 10 for i in ids} for ids in first]
    assert len(files[0]) == len(files[1]) == 2 and not files[0] & files[1]
    assert not set(first[0]) & set(first[1])  # distinct samples on each process
    assert set(first[0]) | set(first[1]) == set(range(40))  # together, the whole split
    assert all(r["validation"] == list(range(100, 106)) for r in ranks)


# -- the GPU suite's multi-GPU entry -------------------------------------------------------------------------------


def test_gpu_suite_measures_ddp_scaling_on_several_gpus_and_says_why_not_on_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_all", ROOT / "benchmarks" / "bench_all.py")
    bench_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_all)
    for quick in (False, True):
        runs = {name: command for name, command, _ in bench_all.suite("cuda", quick, "seed-vit-b8-64", gpus=4)}
        command = runs["ddp_scaling"]
        assert command[1].endswith("bench_scaling.py") and command[command.index("--processes") + 1] == "4"
        assert list(runs).index("ddp_scaling") == 5  # right after the five runs a quick suite keeps
        skipped = dict((name, command) for name, command, _ in bench_all.suite("cuda", quick, "x", gpus=1))
        assert skipped["ddp_scaling"] == "1 GPU on this machine: DDP scaling needs at least two"
    assert "ddp_scaling" not in {name for name, _, _ in bench_all.suite("cpu", False, "demo-tiny-32")}
    # the command each measurement runs: torchrun of the scaling script's worker on that many processes
    spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "benchmarks" / "bench_scaling.py")
    bench_scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scaling)
    args = bench_scaling.argparse.Namespace(device="cuda", preset="p", dtype="bf16", batch=None, steps=7, warmup=None)
    worker = bench_scaling.worker_command(args, 4, Path("out.json"))
    assert worker[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert worker[-6:] == ["--dtype", "bf16", "--steps", "7", "--json", "out.json"] and "--worker" in worker
