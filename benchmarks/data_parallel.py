"""Training speed of a W-process torchrun run against one process at the same
total number of threads, on this machine.

    python benchmarks/data_parallel.py                       # fern small config, 2 processes x 1 thread vs 1 x 2
    python benchmarks/data_parallel.py --nproc 2 --device cuda   # on a machine with 2 GPUs

Each setting runs run_nerf.py twice, for --short and --long steps; the
difference of the two wall times is the time of (long - short) steady
steps, without start-up, data loading or process-group set-up. The two
settings alternate, `--repeats` times, and the medians are reported.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--netdepth", "4", "--netwidth", "64", "--netdepth_fine", "4", "--netwidth_fine", "64",
         "--N_rand", "512", "--N_samples", "32", "--N_importance", "32"]
QUIET = ["--i_print", "1000000", "--i_img", "1000000", "--i_video", "1000000", "--i_testset", "1000000",
         "--i_weights", "1000000", "--no_reload"]


def wall_time(cmd, env) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "fern.txt"))
    p.add_argument("--datadir", default=None, help="default: the config's, or $NERF_DATA's fern")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="total threads (default: the machine's cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--short", type=int, default=20)
    p.add_argument("--long", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2)
    args, extra = p.parse_known_args(argv)
    threads = args.threads or os.cpu_count()
    datadir = args.datadir or str(Path(os.environ.get("NERF_DATA", REPO.parent / "shared" / "data"))
                                  / "nerf_llff_data" / "fern")
    base = tempfile.mkdtemp(prefix="nerf_ddp_bench_")
    common = ["--config", args.config, "--datadir", datadir, "--basedir", base, "--device", args.device,
              *SMALL, *QUIET, *extra]

    settings = {
        "1 process": ([sys.executable, str(REPO / "run_nerf.py")], threads),
        f"{args.nproc} processes": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", str(args.nproc), str(REPO / "run_nerf.py")],
                                    max(1, threads // args.nproc)),
    }
    rates = {name: [] for name in settings}
    for r in range(args.repeats):
        for name, (launcher, per_process) in settings.items():
            env = dict(os.environ, OMP_NUM_THREADS=str(per_process), MKL_NUM_THREADS=str(per_process))
            times = [wall_time([*launcher, *common, "--expname", f"{name[0]}_{r}_{n}", "--N_iters", str(n)], env)
                     for n in (args.short, args.long)]
            rates[name].append((args.long - args.short) / (times[1] - times[0]))
            print(f"  {name}: {rates[name][-1]:.2f} steps/s (run {r + 1})", flush=True)
    one, many = (statistics.median(v) for v in rates.values())
    print(f"{args.device}, {threads} threads in all: 1 process {one:.2f} steps/s, {args.nproc} processes "
          f"{many:.2f} steps/s: {many / one:.2f}x (same N_rand, same steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
