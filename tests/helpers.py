"""Shared test fixtures: a model small enough that a forward pass takes milliseconds."""

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
