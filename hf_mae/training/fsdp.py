"""FSDP through accelerate, made to do what its config says: the model is really sharded, or the run refuses.

accelerate (1.16) turns a launch with `distributed_type: FSDP` into FSDP only when the processes have accelerators;
on CPU processes (gloo) it silently trains with plain DDP. torch's FSDP2 (`fully_shard`) runs on CPU with gloo, so
[`enable_fsdp2_on_cpu`] gives such a launch the FSDP state accelerate would have made on GPUs, and
[`check_fsdp_applied`] / [`check_model_sharded`] stop any run where FSDP was asked for and is not what trains.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# the folder name accelerate gives a sharded (torch.distributed.checkpoint) model inside a checkpoint: <name>_<i>
try:
    from accelerate.utils.constants import FSDP_MODEL_NAME
except ImportError:  # pragma: no cover - older accelerate
    FSDP_MODEL_NAME = "pytorch_model_fsdp"


def fsdp_requested(args: Any = None) -> bool:
    """True when the launch asks for FSDP: an accelerate config / flag (`ACCELERATE_USE_FSDP`, which accelerate also
    sets when it is handed a plugin) or the `--fsdp` training argument."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        or getattr(args, "fsdp_plugin_args", None) is not None
    )


def requested_fsdp_version(args: Any = None) -> int:
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    return int(plugin_args.get("fsdp_version", os.environ.get("FSDP_VERSION", 1)))


def enable_fsdp2_on_cpu(accelerator, args: Any = None) -> bool:
    """Give a multi-process CPU launch that asked for FSDP2 the FSDP state accelerate only makes on accelerators.

    Returns True when it did. `accelerator.prepare` then shards the model with `fully_shard` over the gloo world,
    exactly as on GPUs (same plugin, built from the launch's `FSDP_*` variables or the `--fsdp_config`).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested(args) or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if requested_fsdp_version(args) != 2:
        return False  # FSDP1 is left to accelerate; check_fsdp_applied refuses it here
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState itself records it
    logger.info("FSDP2 on %d CPU processes (gloo): accelerate's FSDP state set for them", accelerator.num_processes)
    return True


def check_fsdp_applied(accelerator, args: Any = None) -> None:
    """Raise a `ValueError` when FSDP was requested but accelerate set up something else (a single process, FSDP1
    on CPU, a device accelerate does not shard on): never train unsharded when sharding was asked for."""
    from accelerate.utils import DistributedType

    if not fsdp_requested(args) or accelerator.distributed_type == DistributedType.FSDP:
        return
    raise ValueError(
        f"FSDP was requested (accelerate config `distributed_type: FSDP`, fsdp_version "
        f"{requested_fsdp_version(args)}, or --fsdp) but accelerate set up {accelerator.distributed_type.value} with "
        f"{accelerator.num_processes} process(es), which would train an unsharded model. FSDP needs a multi-process "
        "launch: `accelerate launch --config_file accelerate_configs/fsdp2.yaml ...` on GPUs, or "
        "`accelerate_configs/cpu_fsdp2.yaml` (FSDP2, gloo) on CPU processes; FSDP1 is not supported on CPU."
    )


def check_model_sharded(model: torch.nn.Module, fsdp_version: int) -> None:
    """Raise a `ValueError` unless `model` (as the Trainer trains it) is FSDP-wrapped; with FSDP2 at least its
    parameters must be DTensors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    if fsdp_version == 2:
        sharded = isinstance(model, FSDPModule) and any(hasattr(p, "placements") for p in model.parameters())
    else:
        sharded = isinstance(model, FSDP1) or any(isinstance(m, FSDP1) for m in model.modules())
    if not sharded:
        raise ValueError(
            f"FSDP{fsdp_version} was requested but the model being trained is a plain {type(model).__name__}: "
            "refusing to train it unsharded"
        )


def plain_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`model` as its own class holding the full `state_dict`, for `save_pretrained`. FSDP2 swaps a sharded model's
    class for a generated `FSDP<class>` defined in torch, so saving it directly would name that class in config.json
    and copy torch's FSDP sources as the directory's remote code. Its parameters are created empty (accelerate's
    `init_empty_weights`): no weights allocated besides `state_dict`'s."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights():
        plain = cls(model.config)
    plain.load_state_dict(state_dict, assign=True)
    return plain


def sharded_model_dirs(checkpoint: str | Path) -> list[Path]:
    """The sharded (torch.distributed.checkpoint) model folders accelerate wrote into `checkpoint`."""
    return sorted(p for p in Path(checkpoint).glob(f"{FSDP_MODEL_NAME}_*") if p.is_dir())


def incomplete_sharded_model(checkpoint: str | Path) -> str | None:
    """Why a sharded model in `checkpoint` is unusable (None when complete, or when there is none):
    torch.distributed.checkpoint writes `.metadata` after every process has written its shard."""
    for folder in sharded_model_dirs(checkpoint):
        if not (folder / ".metadata").is_file():
            return f"{folder.name} has no .metadata (the sharded save was interrupted)"
    return None


def load_sharded_model(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full tensors of a sharded model folder, read in this one process (no process group needed)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.pt"
        dcp_to_torch_save(str(folder), str(target))
        state = torch.load(target, map_location="cpu", weights_only=True)
    state = state.get("model", state)  # accelerate saves {"model": state_dict}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
