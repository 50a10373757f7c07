"""Counts, on any device (the CPU too), the calls that would make the host wait
for a GPU: reading a tensor's value (`.item()`, `.tolist()`, `.numpy()`,
`.cpu()`, `bool()`, `float()`, `int()` of a tensor, `str()`, `repr()` or
formatting one), ops whose output size depends on values (`nonzero`,
`bincount`, boolean-mask indexing and assignment, ...), waiting on CUDA
events, streams or the device (`synchronize`), and
copies that are not `non_blocking` (`.to(device)`, `.cuda()`, a `.copy_` between
devices, `torch.tensor` / `torch.as_tensor` of host data onto a device).

On the CPU every tensor is a host tensor, so a `.to()` cannot be told apart
from a no-op by its devices: any `.to()` naming a device without
`non_blocking=True` counts (on a GPU it blocks, or is a no-op). Calls made by
torch's own optimisers are not counted: Adam keeps its step count on the host
by design (that `.item()` never waits for the GPU). Nor are reads of a host
buffer that an earlier step filled by a non-blocking copy, through a NumPy view
after that step's event (the stop requests of nerf/parallel.py, the collapse
guard's streaks of nerf/collapse.py): they wait for the previous step's work
only, with the current step's work queued behind it.

    with HostSyncCounter() as syncs:
        syncs.step = i              # optional: which step the calls belong to
        ...
    syncs.calls   # [(step, what, "file:line")]

Run as a program (under torchrun, say) it trains with `run_nerf.main(argv)`
and writes each rank's calls, by step, to `$HOST_SYNCS_OUT.<rank>.json`.
"""
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__",
         "__format__", "__repr__", "__str__", "nonzero", "argwhere", "bincount", "masked_select", "unique",
         "unique_consecutive", "equal",
         "allclose", "repeat_interleave"}
COPIES = {"to", "cuda"}
FROM_HOST = {"tensor", "as_tensor"}
TORCH_DIR = str(Path(torch.__file__).parent)
IGNORED = (os.path.join(TORCH_DIR, "optim"), os.path.join(TORCH_DIR, "overrides.py"), __file__)


def _names_a_device(args, kwargs) -> bool:
    """Whether a `.to(...)` call names a device (a device, a string or another tensor)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor) and a is not args[0])
               for a in args[1:])


def would_sync(name: str, args, kwargs) -> Optional[str]:
    """What about the call `name(*args, **kwargs)` would wait for a GPU, or None."""
    if name in READS:
        return name
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return "boolean-mask indexing" if name == "__getitem__" else "boolean-mask assignment"
    if name in COPIES and not kwargs.get("non_blocking", False) and _names_a_device(args, kwargs):
        return f"blocking .{name}()"
    if name == "copy_" and not kwargs.get("non_blocking", False) and len(args) > 1 \
            and isinstance(args[1], torch.Tensor) and args[1].device != args[0].device:
        return "blocking .copy_() between devices"
    if name in FROM_HOST and kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor):
        return f"torch.{name}(host data, device=...)"
    return None


def _caller() -> Optional[str]:
    """file:line of the Python code that made the call, or None for calls to ignore."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(IGNORED[1:]):
        frame = frame.f_back
    if frame is None or frame.f_code.co_filename.startswith(IGNORED[0]):
        return None
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


WAITS = ((torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda, "synchronize"))


class HostSyncCounter(TorchFunctionMode):
    """Records every call that would synchronise a GPU (see the module docstring).
    The `synchronize` of CUDA events, streams and `torch.cuda` are no torch
    functions: they are wrapped while the counter is active."""

    def __init__(self):
        super().__init__()
        self.step: Optional[int] = None
        self.calls: List[Tuple[Optional[int], str, str]] = []
        self._unwrapped: list = []

    def __enter__(self):
        for owner, name in WAITS:
            original = getattr(owner, name)
            self._unwrapped.append((owner, name, original))
            setattr(owner, name, self._counting(original, f"{getattr(owner, '__name__', 'torch.cuda')}.{name}()"))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._unwrapped):
            setattr(owner, name, original)
        self._unwrapped.clear()
        return super().__exit__(*exc)

    def _counting(self, original, what: str):
        def wait(*args, **kwargs):
            where = _caller()
            if where is not None:
                self.calls.append((self.step, what, where))
            return original(*args, **kwargs)
        return wait

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = would_sync(getattr(func, "__name__", ""), args, kwargs)
        if what is not None:
            where = _caller()
            if where is not None:
                self.calls.append((self.step, what, where))
        return func(*args, **kwargs)

    def by_step(self) -> dict:
        """{step: ["what at file:line", ...]}."""
        out: dict = {}
        for step, what, where in self.calls:
            out.setdefault(step, []).append(f"{what} at {where}")
        return out


class StepMarkingSampler:
    """A ray sampler that tells `syncs` which step it draws for."""

    def __init__(self, sampler, syncs: HostSyncCounter):
        self.sampler, self.syncs = sampler, syncs

    def __call__(self, step: int):
        self.syncs.step = step
        return self.sampler(step)

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


def count_training(argv) -> Tuple[int, dict]:
    """Trains with `run_nerf.main(argv)` under a HostSyncCounter whose step is
    the one the ray sampler is drawing for. Returns (exit status, by_step())."""
    import run_nerf
    make_sampler = run_nerf.make_sampler
    syncs = HostSyncCounter()
    run_nerf.make_sampler = lambda *args, **kwargs: StepMarkingSampler(make_sampler(*args, **kwargs), syncs)
    try:
        with syncs:
            status = run_nerf.main(argv)
    finally:
        run_nerf.make_sampler = make_sampler
    return status, syncs.by_step()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    code, found = count_training(sys.argv[1:])
    Path(f"{os.environ['HOST_SYNCS_OUT']}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(found))
    sys.exit(code)
