"""torchrun support: process-group setup, DDP or FSDP2 wrapping, and the few collectives the trainer needs.

Launch with `torchrun --nproc-per-node N -m monovlm train ...`. On CPU the backend is gloo, on GPUs nccl. With one
process (plain `monovlm train`) every function here is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    torch_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, torch_device)


def wrap(module: nn.Module, info: DistInfo, strategy: str) -> nn.Module:
    """DDP: a full replica per rank, gradients all-reduced. FSDP2: parameters sharded per decoder block and root."""
    if not info.enabled:
        return module
    if strategy == "ddp":
        # Unused parameters are normal here: a text-only batch leaves the embedder and the vision experts idle.
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in module.model.decoder.layers:
            fully_shard(block)
        fully_shard(module)
        return module
    raise ValueError(f"unknown distributed strategy {strategy!r}; use ddp or fsdp")


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_state(module: nn.Module, optimizer, info: DistInfo, strategy: str,
                 with_optimizer: bool) -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state dicts, on CPU. Under FSDP every rank must call this (it is a
    collective); the full tensors land on rank 0."""
    if strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(module, options=options)
        optim_state = get_optimizer_state_dict(module, optimizer, options=options) if with_optimizer else None
        return model_state, optim_state
    return module.state_dict(), optimizer.state_dict() if with_optimizer else None


def load_optimizer_state(module: nn.Module, optimizer, state: dict, info: DistInfo, strategy: str) -> None:
    """Restore a full optimizer state dict (as `gather_state` wrote it) into a possibly sharded optimizer."""
    if strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
