"""The steady-state training step never makes the host wait for the device
(issue 19, item 8): counted on the CPU with `host_syncs.HostSyncCounter`,
over 20 steady-state steps, with and without ray batching, and in a 2-process
gloo run, with the collapse guard on (the default: it reads each step's
streaks one step late, from a host copy). Only the i_print steps (the [TRAIN]
line reads the loss) and the run's first and last steps (the fast path's
probe, the final save) may read values."""
import json
import os
import subprocess
import sys

import pytest
import torch

from host_syncs import HostSyncCounter, count_training
from test_cli import QUIET, TINY
from test_demo_run import demo_dir  # noqa: F401 (fixture)
from test_distributed import ENV, torchrun_cmd

N_ITERS, I_PRINT = 24, 10
STEADY = [i for i in range(2, N_ITERS) if i % I_PRINT]         # 20 steps


def sync_args(demo_dir, tmp_path, *extra):
    return ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(tmp_path), "--expname", "s",
            "--white_bkgd", *TINY, *QUIET, "--i_print", str(I_PRINT), "--N_iters", str(N_ITERS), *extra]


def waiting(wait, *args):
    """A CUDA wait; without CUDA the call fails after the counter has seen it."""
    try:
        wait(*args)
    except (RuntimeError, AssertionError, AttributeError, TypeError):
        pass


def test_the_counter_sees_each_kind_of_synchronising_call_and_nothing_else():
    t = torch.arange(4.0)
    syncs = [lambda: t[0].item(), lambda: t.tolist(), lambda: t.numpy(), lambda: t.cpu(), lambda: bool(t[1]),
             lambda: float(t[0]), lambda: int(t[0]), lambda: f"{t[0]:.2f}", lambda: t[t > 1],
             lambda: t.nonzero(), lambda: t.to("cpu"), lambda: t.to(device=t.device),
             lambda: torch.tensor([1.0], device="cpu"), lambda: torch.as_tensor([1.0], device=t.device),
             lambda: str(t), lambda: repr(t), lambda: f"{t}", lambda: t.clone().__setitem__(t > 1, 0.0),
             lambda: torch.bincount(t.long()), lambda: waiting(torch.cuda.Event.synchronize, None),
             lambda: waiting(torch.cuda.Stream.synchronize, None), lambda: waiting(torch.cuda.synchronize)]
    free = [lambda: t + 1, lambda: t.to("cpu", non_blocking=True), lambda: t.to(torch.float64), lambda: t[1:3],
            lambda: torch.as_tensor(t, device=t.device), lambda: torch.tensor([1.0]), lambda: t.clone().copy_(t),
            lambda: torch.where(t > 1, t, 0 * t), lambda: t[torch.tensor([0, 2])]]
    for k, call in enumerate(syncs + free):
        with HostSyncCounter() as counter:
            call()
        assert len(counter.calls) == (1 if k < len(syncs) else 0), (k, counter.calls)


@pytest.mark.parametrize("batching", [[], ["--no_batching"]], ids=["batching", "no_batching"])
def test_the_steady_state_step_never_waits_for_the_device(demo_dir, tmp_path, batching):  # noqa: F811
    status, found = count_training(sync_args(demo_dir, tmp_path, *batching))
    assert status == 0
    assert {i: found[i] for i in STEADY if i in found} == {}
    assert found.get(I_PRINT), "the counter sees the [TRAIN] line's reads"


@pytest.mark.slow
def test_the_steady_state_step_of_two_processes_never_waits_for_the_device(demo_dir, tmp_path):  # noqa: F811
    out = tmp_path / "syncs"
    cmd = torchrun_cmd(sync_args(demo_dir, tmp_path), 2)
    cmd[cmd.index("--nproc_per_node") + 2] = os.path.join(os.path.dirname(__file__), "host_syncs.py")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(ENV, HOST_SYNCS_OUT=str(out), PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The demo's 5760 rays make 22 batches of 256 and a last one of 128 (step 23), all of it rank 0's: rank 1,
    # without gradients of its own, reads which parameters rank 0 gave one. Once an epoch, never in between.
    epoch_end = {0: [], 1: ["tolist at parallel.py"]}
    for rank in (0, 1):
        found = {int(k): v for k, v in json.loads(out.with_suffix(f".{rank}.json").read_text()).items()
                 if k != "null"}
        assert [c.split(":")[0] for c in found.get(23, [])] == epoch_end[rank]
        assert {i: found[i] for i in STEADY if i in found and i != 23} == {}, rank
    assert found.get(N_ITERS), "the counter sees the final save's reads on rank 1 too"
