"""k-NN monitor: the weighted k-NN on hand-made features, the callback in short Trainer runs, state left untouched."""

import math
import os
import random
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY

from hf_mae import MAEConfig, MAEForPreTraining
from hf_mae.training import MAEPretrainingArguments, MAETrainer
from hf_mae.training.knn import KNNArguments, KNNMonitor, knn_top1, knn_votes


def test_knn_perfect_clusters_give_100_percent():
    torch.manual_seed(0)
    centers = torch.eye(8) * 5  # 8 well separated directions
    memory_labels = torch.arange(8).repeat_interleave(10)
    query_labels = torch.arange(8).repeat_interleave(4)
    memory = centers[memory_labels] + 0.1 * torch.randn(80, 8)
    queries = centers[query_labels] + 0.1 * torch.randn(32, 8)
    assert knn_top1(memory, memory_labels, queries, query_labels, k=20) == 100.0
    # features are compared by cosine: scaling them changes nothing
    assert knn_top1(memory * 7, memory_labels, queries * 0.01, query_labels, k=5) == 100.0


def _at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_weighting_matches_hand_computed_votes():
    # query at 0 degrees; neighbours at 10 (class 1), 20 and 25 (class 0), 90 (class 2, outside k=3)
    memory = torch.tensor([_at(10), _at(20), _at(25), _at(90)]) * torch.tensor([[3.0], [1.0], [0.5], [2.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([_at(0)])
    sims = [math.cos(math.radians(d)) for d in (10, 20, 25)]
    for temperature in (0.07, 1.0):
        votes = knn_votes(memory, labels, query, num_classes=3, k=3, temperature=temperature)[0]
        expected = [math.exp(sims[1] / temperature) + math.exp(sims[2] / temperature), math.exp(sims[0] / temperature)]
        assert votes[0].item() == pytest.approx(expected[0], rel=1e-5)
        assert votes[1].item() == pytest.approx(expected[1], rel=1e-5)
        assert votes[2].item() == 0.0
    # a sharp temperature lets the single closest neighbour win; a flat one lets the majority win
    assert knn_top1(memory, labels, query, torch.tensor([1]), num_classes=3, k=3, temperature=0.07) == 100.0
    assert knn_top1(memory, labels, query, torch.tensor([0]), num_classes=3, k=3, temperature=1.0) == 100.0
    # k larger than the memory bank is clipped
    assert knn_votes(memory, labels, query, num_classes=3, k=50).shape == (1, 3)


def test_knn_arguments_validate():
    assert KNNArguments().knn_k == 20 and KNNArguments().knn_temperature == 0.07
    with pytest.raises(ValueError, match="knn_feature"):
        KNNArguments(knn_feature="avg")
    with pytest.raises(ValueError, match="knn_temperature"):
        KNNArguments(knn_temperature=0)
    assert KNNMonitor.from_args(KNNArguments()) is None


class _Labelled(torch.utils.data.Dataset):
    """Two classes a blur of which a random encoder already separates: bright vs dark images."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.images = torch.randn(n, 3, 16, 16, generator=g) * 0.3 + (self.labels.float() * 2 - 1).view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "label": int(self.labels[i])}


def _args(tmp_path, **kwargs):
    return MAEPretrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        warmup_steps=1,
        base_learning_rate=None,
        learning_rate=1e-3,
        logging_steps=3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=5,
        **kwargs,
    )


def _train(tmp_path, callbacks, **kwargs):
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY))
    trainer = MAETrainer(
        model=model, args=_args(tmp_path, **kwargs), train_dataset=_Labelled(32, 1), callbacks=callbacks
    )
    trainer.train()
    return trainer


def test_from_args_takes_its_data_from_the_given_loader(tmp_path):
    calls = []

    def load(image_size, seed):
        calls.append((image_size, seed))
        return _Labelled(12, 2), _Labelled(6, 3)

    monitor = KNNMonitor.from_args(KNNArguments(knn_eval_steps=2, knn_k=3), load)
    assert monitor.every_n_steps == 2 and monitor.k == 3 and not calls  # loaded at the start of training only
    model = MAEForPreTraining(MAEConfig(**TINY))
    assert 0 <= monitor.evaluate(model, _args(tmp_path)) <= 100
    assert calls == [(TINY["image_size"], 5)]  # the model's image size and the run's seed
    monitor.evaluate(model)
    assert len(calls) == 1  # cached
    with pytest.raises(ValueError, match="load_datasets"):
        KNNMonitor(1)


def test_the_pipeline_loader_reads_the_data_arguments():
    from hf_mae.training import DataArguments
    from hf_mae.training.pipeline import knn_datasets

    data_args = DataArguments(dataset_name="digits", max_train_samples=20, max_eval_samples=10)
    monitor = KNNMonitor.from_args(KNNArguments(knn_eval_steps=1), knn_datasets(data_args))
    memory, queries = monitor.load_datasets(24, 0)
    assert len(memory) == 20 and len(queries) == 10
    assert memory[0]["pixel_values"].shape == (3, 24, 24) and isinstance(queries[0]["label"], int)


def test_callback_logs_knn_top1_and_leaves_training_unchanged(tmp_path):
    monitor = KNNMonitor(2, _Labelled(40, 2), _Labelled(20, 3), k=5, batch_size=16)
    with_knn = _train(tmp_path / "a", [monitor])
    entries = [e for e in with_knn.state.log_history if "knn_top1" in e]
    assert [e["step"] for e in entries] == [0, 2, 4]
    assert all(0 <= e["knn_top1"] <= 100 for e in entries)
    assert entries[-1]["knn_top1"] > 90  # bright vs dark is easy
    # the forced log at step 2 carries the training loss too
    assert "loss" in next(e for e in with_knn.state.log_history if e["step"] == 2)
    # same seed without the monitor: the same random stream, hence the same weights and losses
    without = _train(tmp_path / "b", [])
    a, b = with_knn.model.state_dict(), without.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert with_knn.model.training == without.model.training


def test_callback_under_bf16_autocast(tmp_path):
    monitor = KNNMonitor(4, _Labelled(40, 2), _Labelled(20, 3), k=5, at_start=False)
    trainer = _train(tmp_path, [monitor], bf16=True, use_cpu=True)
    (entry,) = [e for e in trainer.state.log_history if "knn_top1" in e]
    assert entry["step"] == 4 and 0 <= entry["knn_top1"] <= 100


def test_evaluate_restores_modes_and_random_state():
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY, drop_path_rate=0.1)).train()
    model.decoder.eval()  # e.g. a frozen part kept in eval inside a model in training mode
    modes = {name: m.training for name, m in model.named_modules()}
    monitor = KNNMonitor(1, _Labelled(12, 2), _Labelled(6, 3), k=3, feature="mean")
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    top1 = monitor.evaluate(model, SimpleNamespace(bf16=False, fp16=False, seed=0))
    assert 0 <= top1 <= 100 and monitor.last_seconds > 0
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])
    # eval features are deterministic (no mask, no drop path): the same value twice
    assert monitor.evaluate(model, SimpleNamespace(bf16=False, fp16=False, seed=0)) == top1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MAEForPreTraining(MAEConfig(**TINY))
        monitor = KNNMonitor(1, _Labelled(13, 2), _Labelled(7, 3), k=3, batch_size=4)  # 13 and 7: uneven shards
        monitor._load(model, 0)
        features = monitor.embed(model, monitor._cache["memory"][0])
        top1 = monitor.evaluate(model, SimpleNamespace(bf16=False, fp16=False, seed=0))
        torch.save({"features": features, "top1": top1}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_shards_and_gathers_like_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY))
    monitor = KNNMonitor(1, _Labelled(13, 2), _Labelled(7, 3), k=3, batch_size=4)
    monitor._load(model, 0)
    single = monitor.embed(model, monitor._cache["memory"][0])
    top1 = monitor.evaluate(model, SimpleNamespace(bf16=False, fp16=False, seed=0))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["features"].shape == single.shape
        assert torch.allclose(result["features"], single, atol=1e-5)
        assert result["top1"] == top1
