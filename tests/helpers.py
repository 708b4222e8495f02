"""Shared test fixtures: a model small enough that a forward pass takes milliseconds; whether a process runs."""

from pathlib import Path

from hf_mae import MAEConfig

TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
)


def tiny_config(**overrides) -> MAEConfig:
    return MAEConfig(**{**TINY, **overrides})


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
