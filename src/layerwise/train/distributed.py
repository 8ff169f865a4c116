"""Process setup for torchrun: DDP or FSDP2 from torch.distributed, nothing home-made.

Launch: `torchrun --standalone --nproc_per_node=8 -m layerwise.cli train ...`. Without torchrun the same
code runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_choice: str = "auto") -> Runtime:
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return Runtime(device, rank, world, local_rank)
    return Runtime(torch.device("cuda") if use_cuda else torch.device("cpu"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, rt: Runtime, fsdp: bool) -> nn.Module:
    """DDP (default) or FSDP2 across the torchrun processes.

    FSDP2 shards each sublayer's attention / MLP module, then the root (embeddings, norms, AttnRes mixers).
    Not whole layers: AttnRes schemes call a sublayer's `branch` directly, which would bypass a layer-level
    unshard hook, while the attention and MLP modules are always entered through their own forward.
    """
    if not rt.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer.attn.fn)
            fully_shard(layer.mlp.fn)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def mean_over_processes(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if rt.device.type == "cuda" else dist.ReduceOp.SUM)
        if rt.device.type != "cuda":  # gloo has no AVG
            value /= rt.world_size
    return value


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()
