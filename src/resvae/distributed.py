"""torchrun / DistributedDataParallel, wired in one place (nanoGPT's way).

`torchrun --nproc_per_node N -m resvae train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we read them
here and nowhere else. Everything else asks the `Runtime`.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError


@dataclass
class Runtime:
    """Process-level state that is never written into the config."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA (one GPU per local rank), then MPS, then CPU; an explicit choice that is
    not available is an error rather than a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine "
                           "(use --device cpu or auto)")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine (use --device cpu "
                          "or auto)")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's with its core count: what a record says ran it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def launch_env(environ=os.environ) -> dict[str, str] | None:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for this
    process: torchrun's own, or under `srun --ntasks N` (N > 1) Slurm's: SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST (expanded by `scontrol
    show hostnames`) and a port from the job id. None for a plain process, or one Slurm task."""
    if "RANK" in environ or not _slurm_ranked(environ):
        return None  # torchrun set them all already, or not several processes
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                           text=True, timeout=30).stdout.split() if nodes else []
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
            # one port per job (and step), the same on every task of it
            "MASTER_PORT": environ.get("MASTER_PORT") or str(
                20000 + (int(environ.get("SLURM_JOB_ID", "0")) * 7
                         + int(environ.get("SLURM_STEP_ID", "0") or 0)) % 20000)}


def _slurm_ranked(environ) -> bool:
    """A task of `srun --ntasks N` (N > 1). SLURM_STEP_NUM_TASKS: srun sets it for its tasks; a
    batch script's own process (which has SLURM_NTASKS of the whole allocation) is no rank."""
    return int(environ.get("SLURM_STEP_NUM_TASKS", "1")) >= 2 and "SLURM_PROCID" in environ


def launched_as_main(environ=os.environ) -> bool:
    """Whether this process is rank 0 (or alone), before `setup` has run: the one that writes.
    (Slurm's rank is read directly: the master's address, and its `scontrol`, are not needed.)"""
    if "RANK" in environ:
        return int(environ["RANK"]) == 0
    return not _slurm_ranked(environ) or environ["SLURM_PROCID"] == "0"


def setup(device: str = "auto", timeout: float | None = None) -> Runtime:
    """Initialise the process group when launched by torchrun; a plain process is rank 0 of 1.
    `timeout` (seconds): how long a collective waits for the other ranks before it fails, so a
    hung peer ends the run with an error instead of blocking it forever (a dead one breaks
    gloo's connections at once)."""
    os.environ.update(launch_env() or {})  # srun --ntasks N: as torchrun would have set them
    if "RANK" not in os.environ:
        return Runtime(resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout) if timeout else None)
    return Runtime(dev, rank, world, local_rank)


def teardown(rt: Runtime, sync: bool = False) -> None:
    """Destroy the process group. `sync` (a run that ended normally): every rank first waits at
    a barrier, so none closes its gloo connections while another is still in a collective (a
    rank aborted with "terminate called without an active exception" in CI without it). An
    error path skips it: a peer may never arrive."""
    if rt.ddp and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, rt: Runtime, sync_bn: bool = False) -> nn.Module:
    """DDP-wrap the model (no-op for one process); optionally synchronise BatchNorm statistics."""
    if not rt.ddp:
        return model
    if sync_bn:
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if rt.device.type == "cuda"
                 else convert_cpu_sync_bn(model))
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(t: Tensor, rt: Runtime) -> Tensor:
    if rt.ddp:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if it is true on any: keeps early stops and budgets in lock step."""
    if not rt.ddp:
        return flag
    t = torch.tensor([float(flag)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """A 0-d bool tensor, true where it is true on every rank: `any_rank`'s decision for
    --guard device, made on the device (no host read; the collective is queued like a kernel)."""
    if not rt.ddp:
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def agree_max(values: list[int], rt: Runtime) -> list[int]:
    """The element-wise maximum over ranks of a few small integers (stop and checkpoint
    requests): one collective, so every rank takes the same decision at the same step."""
    if not rt.ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def gather_to_main(obj, rt: Runtime) -> list:
    """Every rank's `obj`, in rank order (all ranks get the list; rank 0 is the one that uses
    it): per-rank state such as RNG states that a checkpoint must carry for each rank."""
    if not rt.ddp:
        return [obj]
    out = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, rt: Runtime, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank: without sync BN each
    rank's drift apart, yet evaluation and checkpoints must see one model."""
    if rt.ddp:
        for b in module.buffers():
            dist.broadcast(b, src)


def barrier(rt: Runtime) -> None:
    if rt.ddp:
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (what the deprecated
    torch.distributed.nn.functional.all_reduce does; its replacement is a private module)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics span all ranks, for CPU/gloo.

    nn.SyncBatchNorm refuses CPU tensors (its kernels are CUDA-only), yet `--sync-bn` must work
    on CPU for tests and laptops. Two-pass mean/variance with an autograd-aware all_reduce,
    so gradients also flow through the global statistics.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype))
        mean = all_reduce(x.sum(dims)) / count
        var = all_reduce((x - mean.view(shape)).square().sum(dims)) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * count / (count - 1), m)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def convert_cpu_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d by a CPUSyncBatchNorm carrying the same state."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_cpu_sync_bn(child))
    return module


__all__ = ["Runtime", "launch_env", "setup", "teardown", "wrap", "unwrap", "all_reduce_sum", "any_rank",
           "agree_max", "gather_to_main",
           "barrier", "resolve_device", "device_name", "CPUSyncBatchNorm", "convert_cpu_sync_bn"]
