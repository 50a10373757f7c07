"""Data-parallel training over `torch.distributed`, as launched by `torchrun`.

    torchrun --nproc_per_node=N run_nerf.py --config configs/fern.txt

torchrun gives each of the W processes its RANK, LOCAL_RANK and WORLD_SIZE
(and where to meet); plain `python run_nerf.py` sets none of them and runs
as rank 0 of 1, with no process group and none of the calls below.

Every rank holds the whole model and renders N_rand / W rays of each step.
After the backward pass one all-reduce sums, over the ranks, their
gradients together with a few per-step numbers (losses, a stop request);
dividing by W gives every rank the same averaged gradient, hence the same
Adam step. Since the ranks' shares are equal, the mean of their mean
squared errors is the mean over all N_rand rays: one W-process step is the
step of one process with the same N_rand, up to float rounding.
"""
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("nerf")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the W processes of a run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and talks on the console."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(environ=os.environ) -> Ranks:
    """The ranks torchrun sets in the environment (one process without them)."""
    def number(name: str, default: int) -> int:
        return int(environ.get(name, default))
    world_size = number("WORLD_SIZE", 1)
    return Ranks(rank=number("RANK", 0), world_size=world_size, local_rank=number("LOCAL_RANK", 0),
                 local_world_size=number("LOCAL_WORLD_SIZE", world_size))


def backend_for(device: torch.device, ranks: Ranks, pinned: bool = False) -> str:
    """NCCL when every local rank has a CUDA device of its own, else gloo
    (CPU runs, or ranks sharing a GPU, which NCCL refuses): ranks share one
    when there are fewer GPUs than local ranks, or when `pinned` (--device
    named one GPU for all). The same answer on every rank of a machine."""
    shared = torch.cuda.device_count() < ranks.local_world_size or (pinned and ranks.local_world_size > 1)
    return "nccl" if device.type == "cuda" and not shared else "gloo"


def ranks_per_device(device: torch.device, ranks: Ranks, pinned: bool = False) -> int:
    """How many of this machine's processes share `device`'s memory: one per
    GPU with NCCL; with shared GPUs, all of them on a pinned one, else as
    many as the round robin puts on each."""
    if device.type != "cuda" or backend_for(device, ranks, pinned) == "nccl":
        return 1
    return ranks.local_world_size if pinned else -(-ranks.local_world_size // torch.cuda.device_count())


def start(ranks: Ranks, device: torch.device, pinned: bool = False, timeout_s: float = 1800) -> None:
    """Joins the process group of a torchrun launch (nothing for one process)."""
    if not ranks.distributed:
        return
    backend = backend_for(device, ranks, pinned)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if ranks.is_main:
        log.info("data-parallel training: %d processes, %s", ranks.world_size, backend)


def started() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Waits for every rank (nothing for one process)."""
    if started():
        dist.barrier()


def stop() -> None:
    if started():
        dist.destroy_process_group()


def noise_seed(seed: int, rank: int, *more: int) -> int:
    """A seed for rank `rank`'s sampling noise (stratified jitter, density
    noise), distinct per rank and per `more` (say, the step resumed at)."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1, dtype=np.uint64)[0] % 2 ** 63)


def broadcast_(tensor: torch.Tensor, device: torch.device, staging_numel: int = 2 ** 24) -> torch.Tensor:
    """Rank 0's `tensor` on every rank, in place. NCCL moves only device
    tensors, so a host tensor goes through `device` there, `staging_numel`
    elements at a time (an epoch's permutation can hold a billion)."""
    if not started():
        return tensor
    if dist.get_backend() != "nccl" or tensor.device.type == "cuda":
        dist.broadcast(tensor, src=0)
        return tensor
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), staging_numel):
        staged = flat[start:start + staging_numel].to(device)
        dist.broadcast(staged, src=0)
        flat[start:start + staging_numel].copy_(staged.cpu())
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise largest of every rank's `tensor`, in place (one process: itself)."""
    if started():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_parameters(parameters: Sequence[torch.Tensor], device: torch.device) -> None:
    """Every rank starts from rank 0's weights (they are built from the same
    seed already; this makes it independent of how each device initialises)."""
    with torch.no_grad():
        for p in parameters:
            broadcast_(p.data, device)


class GradientAverage:
    """After `backward`, replaces each parameter's gradient by the mean over
    all rays of the step, whichever rank rendered them, and likewise the
    per-step `numbers` (0-d tensors, each a mean over this rank's rays);
    returns them with `stop`. One all-reduce of a single flat buffer carries
    it all.

    Rank r counts with its n_r rays: the sums over the ranks of n_r times
    its gradients and numbers, divided by the sum of n_r. The shares are
    equal but for an epoch's short last batch, where a rank may even have
    no rays (it contributes zeros). A parameter gets a gradient where any
    rank has one and, as in one process, none where no rank has.

    No step waits for the device: the host reads which parameters any rank
    gave a gradient only when this rank lacks one (an empty share), and the
    stop requests summed at step i reach the host without blocking, to be
    read at step i + 1: `stop` is True from the step after the one whose
    all-reduce carried a rank's request, the same step on every rank.
    """

    def __init__(self, parameters: Sequence[torch.Tensor]):
        self.parameters = list(parameters)
        device = self.parameters[0].device
        self._stop = torch.zeros((), pin_memory=device.type == "cuda")   # the last step's requests, on the host
        self._stop_view = self._stop.numpy()
        self._stop_copied = None            # a CUDA event: the copy into _stop is done

    def _requested_earlier(self) -> bool:
        """Whether the previous step's all-reduce carried a stop request."""
        if self._stop_copied is not None:
            self._stop_copied.synchronize()    # the previous step's copy: this step's work stays queued
        return bool(self._stop_view > 0)

    def __call__(self, numbers: Dict[str, torch.Tensor], n_rays: int,
                 stop_requested: bool) -> Dict[str, torch.Tensor]:
        params, names = self.parameters, sorted(numbers)      # the same order on every rank
        device = params[0].device
        has_grad = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        values = torch.stack([numbers[k].float().reshape(()) for k in names])
        counts = torch.tensor([float(g) for g in has_grad] + [float(n_rays), float(stop_requested)])
        flat = torch.cat([g.reshape(-1) for g in grads] + [values]) * n_rays
        flat = torch.cat([flat, counts.to(device, non_blocking=True)])
        dist.all_reduce(flat)
        total_rays = flat[-2]
        if not all(has_grad):       # which parameters another rank gave a gradient: read on the host
            has_grad = [n > 0 for n in flat[-2 - len(params):-2].tolist()]
        offset = 0
        for p, any_grad in zip(params, has_grad):
            p.grad = flat[offset:offset + p.numel()].view_as(p) / total_rays if any_grad else None
            offset += p.numel()
        reduced = {k: flat[offset + n] / total_rays for n, k in enumerate(names)}
        reduced["stop"] = self._requested_earlier()
        self._stop.copy_(flat[-1], non_blocking=True)
        if device.type == "cuda":
            self._stop_copied = torch.cuda.Event()
            self._stop_copied.record()
        return reduced


def all_gather(obj: Any, ranks: Ranks) -> List[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    out: List[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any, ranks: Ranks) -> Optional[List[Any]]:
    """Every rank's `obj` in rank order on rank 0; None on the others."""
    if not ranks.distributed:
        return [obj]
    out: Optional[List[Any]] = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def my_share(n: int, ranks: Ranks) -> List[int]:
    """The items of range(n) this rank handles: every W-th, from its rank."""
    return list(range(ranks.rank, n, ranks.world_size))
