"""Training speed under OpenMP's wait policies, on an idle CPU and beside busy processes.

    python benchmarks/omp_wait.py --steps 100 --busy 3 --repeats 2

Trains the demo (configs/demo.txt; its scene written once to a temporary
folder) for `--steps` steps, each run a fresh `run_nerf.py` process, in three
modes:

- torch's defaults: torch is imported before the programs set their wait
  policy (OMP_WAIT_POLICY unset when OpenMP loads, as before they set it);
- passive: the programs as they are (OMP_WAIT_POLICY=PASSIVE unless the user set one);
- one thread: OMP_NUM_THREADS=1, torch imported first (its default waiting).

First with nothing else started, then with `--busy` busy-loop processes
alongside. The modes alternate within each round (so a shared machine's load
hits them alike); each run's wall time (process start to exit) and its ratio
to the passive run of the same round are printed, and whether every mode ends
with the same weights, bit for bit.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "torch's defaults": ({}, True),
    "passive": ({}, False),
    "one thread": ({"OMP_NUM_THREADS": "1"}, True),
}


def command(run_args, torch_first: bool) -> list:
    """The run_nerf.py command line; with torch_first, torch is loaded before run_nerf.py sets the policy."""
    if not torch_first:
        return [sys.executable, str(REPO / "run_nerf.py"), *run_args]
    script = ("import sys, runpy, torch; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", script, str(REPO / "run_nerf.py"), *run_args]


def train(tmp: Path, name: str, steps: int, mode: str) -> float:
    """Seconds one run of `mode` takes, its checkpoint left in tmp/logs/name."""
    extra_env, torch_first = MODES[mode]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(extra_env)
    run_args = ["--config", str(REPO / "configs" / "demo.txt"), "--datadir", str(tmp / "demo"),
                "--basedir", str(tmp / "logs"), "--expname", name, "--no_reload", "--N_iters", str(steps),
                "--i_weights", str(steps), "--i_print", "1000000", "--i_testset", "1000000",
                "--i_video", "1000000"]
    start = time.perf_counter()
    subprocess.run(command(run_args, torch_first), env=env, check=True, cwd=tmp,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def same_weights(paths) -> bool:
    import torch
    first, *others = (torch.load(path, weights_only=True) for path in paths)
    return all(torch.equal(value, other[key][name])
               for other in others for key in ("network_fn_state_dict", "network_fine_state_dict")
               for name, value in first[key].items())


def busy_loops(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--busy", type=int, default=3, help="busy-loop processes alongside in the loaded part")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three modes per load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train(tmp, "warmup", 1, "passive")      # writes the demo scene
        checkpoints = []
        for load in (0, args.busy):
            busy = busy_loops(load)
            try:
                for round_ in range(args.repeats):
                    order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
                    seconds = {}
                    for mode in order:
                        name = f"{load}-{round_}-{mode.replace(' ', '_').replace(chr(39), '')}"
                        seconds[mode] = train(tmp, name, args.steps, mode)
                        checkpoints.append(tmp / "logs" / name / f"{args.steps:06d}.tar")
                    print(f"{load} busy processes, round {round_ + 1} (load average {os.getloadavg()[0]:.1f}): " +
                          ", ".join(f"{mode} {s:.1f} s ({s / seconds['passive']:.2f}x)" for mode, s in seconds.items()),
                          flush=True)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
        print("the same weights in every run:", same_weights(checkpoints))


if __name__ == "__main__":
    main()
