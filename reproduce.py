"""Reproduce the NeRF paper's tables: `python reproduce.py --configs configs/paper/*.txt`.

For each config, in order: train the scene unless it is finished (an
interrupted run resumes from its newest checkpoint, exactly), have the
training render and score its test set at its last step, then write
`results/paper_table.md` and `results/paper_table.json`: per scene and per
dataset mean, PSNR / SSIM / LPIPS beside the paper's values and the
difference (`eval_table.compare`, `eval_table.mean_rows`). A scene counts as
finished when `<basedir>/<expname>/testset_<step>/metrics.json` (or
`renderonly_test_<step>/`) exists for the last step; one trained to the last
step but not scored is rendered with `--render_only --render_test`.

Every scene is a `run_nerf.py` subprocess. On one device they run one after
another, showing the training's own progress bar. With several CUDA GPUs
they run one scene per GPU at a time: the n-th GPU this process sees, so
under `CUDA_VISIBLE_DEVICES=2,3` the scenes go to GPUs 2 and 3. Each scene's
output goes to the terminal and to `<basedir>/<expname>/reproduce.log`, which
keeps it when the terminal goes away: after a hang-up (SIGHUP, an SSH
connection dropped) the scene in training saves its step and stops, as on
SIGTERM, no further scene starts, and the table so far is written. The
training keeps its newest `--keep_checkpoints 2` checkpoints (pass another
value to change it).

    --steps N    N training steps instead of each config's N_iters (a quick pass)
    --dry_run    print the plan and, per scene, the time it would take,
                 from a few training steps and one rendered batch timed here
                 (on --device, when given)

Any other flag is passed to every `run_nerf.py` call (for example
`--chunk 8192` or `--no_download`). Ctrl-C stops the scene in training at
its current step (saved, as `run_nerf.py` does) and writes the table so far.
"""
from __future__ import annotations

import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import argparse
import copy
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import eval_table
from nerf import data_checks, flags, lpips_vgg, run_folder, scoring
from nerf.checkpoints import list_checkpoints
from nerf.errors import DataError
from load_blender import read_transforms

REPO = Path(__file__).resolve().parent
RUN_NERF = REPO / "run_nerf.py"
TABLE_FORMAT = "nerf-pytorch-paper-table/1"
# Flags that set how much one training step costs (the data does not).
_STEP_COST_FLAGS = ("N_rand", "N_samples", "N_importance", "netdepth", "netwidth", "netdepth_fine",
                    "netwidth_fine", "use_viewdirs", "i_embed", "multires", "multires_views", "no_batching",
                    "chunk", "netchunk", "mixed_precision", "compile", "device")
KEEP_CHECKPOINTS = 2   # a paper config's checkpoints add up to ~20 GB when all are kept
STOPPED = (129, 130, 143)   # run_nerf.py's status after SIGHUP, Ctrl-C, SIGTERM (its step saved)
log = logging.getLogger("nerf")


@dataclass
class Scene:
    """One config to reproduce: its parsed flags and the step its table row is for."""
    config: Path
    args: argparse.Namespace   # run_nerf's flags: the config, then the passed-through ones
    steps: int                 # --steps, else the config's N_iters

    @property
    def name(self) -> str:
        return str(self.args.expname)

    @property
    def expdir(self) -> Path:
        return Path(self.args.basedir) / str(self.args.expname)

    def steps_trained(self) -> int:
        """The step of the newest `{step:06d}.tar` in the run folder, 0 without one."""
        steps = [run_folder.checkpoint_step(p) for p in list_checkpoints(self.expdir)]
        return max([s for s in steps if s is not None], default=0)

    def scores(self) -> Path | None:
        """The run's metrics.json for the last step, if it was scored."""
        for folder in ("testset", "renderonly_test"):
            path = self.expdir / f"{folder}_{self.steps:06d}" / scoring.METRICS_FILENAME
            if path.is_file():
                return path
        return None


def load_scenes(configs: Sequence[str], run_nerf_args: Sequence[str], steps: int | None) -> list[Scene]:
    """Parses each config as run_nerf.py will (one-line DataError on a bad one)."""
    import run_nerf

    scenes = []
    for config in configs:
        args = flags.parse_args(run_nerf.config_parser(), ["--config", config, *run_nerf_args])
        if args.expname is None:
            raise DataError(config, "sets no expname (each scene needs its own run folder)")
        scenes.append(Scene(Path(config), args, steps if steps is not None else args.N_iters))
    names = [s.expdir.resolve() for s in scenes]
    for k, scene in enumerate(scenes):
        if names.index(names[k]) != k:
            raise DataError(scene.config, f"uses the run folder {scene.expdir} of another config")
    return scenes


# --- Running ------------------------------------------------------------------

def train_command(scene: Scene, run_nerf_args: Sequence[str]) -> list[str]:
    """run_nerf.py trains to `scene.steps` and scores the test set there; a
    checkpoint falls on the last step."""
    cmd = [sys.executable, str(RUN_NERF), "--config", str(scene.config), *run_nerf_args,
           "--N_iters", str(scene.steps), "--i_testset", str(scene.steps)]
    if scene.steps % scene.args.i_weights:
        cmd += ["--i_weights", str(scene.steps)]
    if not any(arg.startswith("--keep_checkpoints") for arg in run_nerf_args):
        cmd += ["--keep_checkpoints", str(KEEP_CHECKPOINTS)]
    return cmd


def render_command(scene: Scene, run_nerf_args: Sequence[str]) -> list[str]:
    """run_nerf.py renders and scores the test set from the newest checkpoint."""
    return [sys.executable, str(RUN_NERF), "--config", str(scene.config), *run_nerf_args,
            "--render_only", "--render_test"]


def visible_device(gpu: int, environ=os.environ) -> str:
    """CUDA_VISIBLE_DEVICES for a child on the `gpu`-th GPU this process sees:
    that entry of this process's own CUDA_VISIBLE_DEVICES (index 1 under
    "2,3" is "3"; UUIDs too), else the index itself."""
    parent = [entry.strip() for entry in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return parent[gpu] if gpu < len(parent) else str(gpu)


def _tee(source, log_file, terminal) -> None:
    """Copies the child's output to its log file and, while it can be
    written (not after a hang-up), to the terminal."""
    while True:
        try:
            data = os.read(source.fileno(), 65536)
        except KeyboardInterrupt:   # the child got it too and is saving
            continue
        if not data:
            return
        log_file.write(data)
        log_file.flush()
        try:
            terminal().write(data)
            terminal().flush()
        except (OSError, ValueError, AttributeError):   # no terminal any more
            pass


def run_child(cmd: list[str], env: dict | None, output) -> int:
    """Runs one run_nerf.py to its end, its output (stdout and stderr) going
    to the terminal and to `output` (a binary file). Ctrl-C and a hang-up
    reach it too (same process group) and it saves its step before exiting,
    so it is waited for, not killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with proc.stdout:
        _tee(proc.stdout, output, lambda: sys.stdout.buffer)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def reproduce_scene(scene: Scene, run_nerf_args: Sequence[str], env: dict | None = None,
                    output=None) -> tuple[int, str]:
    """Trains (or resumes) and scores one scene unless it is finished.
    Returns (0 when finished, else the failing run's exit status; what happened)."""
    if scene.scores() is not None:
        return 0, f"finished earlier at step {scene.steps}: skipped"
    trained = scene.steps_trained()
    if trained > scene.steps:
        return 1, f"{scene.expdir} holds step {trained}, past {scene.steps}: use --steps to match, or another expname"
    if trained < scene.steps:
        status = run_child(train_command(scene, run_nerf_args), env, output)
        if status != 0:
            return status, f"training stopped with exit status {status}"
    if scene.scores() is None:
        status = run_child(render_command(scene, run_nerf_args), env, output)
        if status != 0:
            return status, f"rendering the test set stopped with exit status {status}"
    if scene.scores() is None:
        return 1, f"no test-set scores for step {scene.steps} (is its newest checkpoint readable?)"
    return 0, scoring.summary_line(scoring.load_metrics(scene.scores()))


def run_all(scenes: list[Scene], run_nerf_args: Sequence[str], n_gpus: int) -> list[bool]:
    """Each scene in turn on one device; with several GPUs, one scene per GPU
    at a time. Prints a line per scene as it starts and ends; after a Ctrl-C,
    SIGTERM or a hang-up (the scene's exit status 130, 143, 129) no further
    scene starts. Returns which finished."""
    total = len(scenes)
    stop = threading.Event()

    def one(k: int, scene: Scene, gpu: int | None) -> bool:
        if stop.is_set():
            return False
        where = f" on GPU {gpu}" if gpu is not None else ""
        print(f"[{k + 1}/{total}] {scene.name} ({scene.config}): step {scene.steps_trained()} of "
              f"{scene.steps}{where}", flush=True)
        env = None if gpu is None else dict(os.environ, CUDA_VISIBLE_DEVICES=visible_device(gpu))
        scene.expdir.mkdir(parents=True, exist_ok=True)
        with open(scene.expdir / "reproduce.log", "ab") as output:
            status, what = reproduce_scene(scene, run_nerf_args, env, output)
        print(f"[{k + 1}/{total}] {scene.name}: {what}", flush=True)
        if status in STOPPED:
            stop.set()
        return status == 0

    if n_gpus <= 1:
        results = []
        for k, scene in enumerate(scenes):
            results.append(one(k, scene, None))
            if stop.is_set():
                break
        return results + [False] * (total - len(results))

    free: queue.Queue = queue.Queue()
    for gpu in range(n_gpus):
        free.put(gpu)

    def on_a_free_gpu(k: int, scene: Scene) -> bool:
        gpu = free.get()
        try:
            return one(k, scene, gpu)
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=n_gpus) as pool:
        futures = [pool.submit(on_a_free_gpu, k, scene) for k, scene in enumerate(scenes)]
        results = []
        for future in futures:
            while True:
                try:
                    results.append(future.result())
                    break
                except KeyboardInterrupt:   # the running scenes got it too and are saving
                    stop.set()
    return results


# --- The table ----------------------------------------------------------------

def write_table(scenes: list[Scene], results_dir: Path, steps: int | None) -> tuple[Path, Path]:
    """results/paper_table.md and .json from the scenes scored so far; the
    same `eval_table.compare` numbers go into both."""
    paper = eval_table.load_paper()
    scored = [s for s in scenes if s.scores() is not None]
    rows = [eval_table.read_run(s.scores()) for s in scored]
    compared = [dict(eval_table.compare(row, paper), config=str(s.config)) for row, s in zip(rows, scored)]
    missing = [{"config": str(s.config), "run": s.name, "steps_trained": s.steps_trained(), "steps": s.steps}
               for s in scenes if s.scores() is None]
    table = {
        "format": TABLE_FORMAT,
        "steps": steps,
        "paper": paper["source"],
        "rows": compared,
        "means": eval_table.mean_rows(compared, paper),
        "not_finished": missing,
    }
    md = ["# The NeRF paper's tables, reproduced", "",
          f"`python reproduce.py --configs {' '.join(str(s.config) for s in scenes)}"
          f"{f' --steps {steps}' if steps is not None else ''}`", "",
          eval_table.format_table(rows, paper, means=True).rstrip("\n")]
    if missing:
        md += ["", "Not finished: " + ", ".join(f"{m['run']} (step {m['steps_trained']} of {m['steps']})"
                                                 for m in missing) + "."]
    md += ["", f"Paper: {paper['source']['paper']}, {paper['source']['venue']} ({paper['source']['tables']})."]
    results_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = results_dir / "paper_table.md", results_dir / "paper_table.json"
    for path, text in ((md_path, "\n".join(md) + "\n"),
                       (json_path, json.dumps(scoring._jsonable(table), indent=2, allow_nan=False) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return md_path, json_path


# --- Dry run --------------------------------------------------------------------

@dataclass
class Timing:
    step_s: float        # one training step
    ray_s: float         # one rendered ray (test settings, no gradients)
    measured_on: str     # which scene's data


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_steps(args: argparse.Namespace, n_steps: int) -> Timing:
    """Seconds per training step and per rendered ray with `args`' settings on
    this device: `n_steps` timed steps after one warm-up step, then one
    batch rendered as the test set is. Writes nothing. Without the scene's
    data the built-in demo scene stands in (a step costs the same on any
    images: rays x samples through the same networks)."""
    import torch

    import run_nerf
    from nerf.datasets import load_scene
    from nerf.rendering import render

    args = copy.copy(args)
    args.no_reload, args.ft_path = True, None
    args.testskip = max(args.testskip, 1000)   # the test images are not needed to time a step
    measured_on = scoring.scene_from_datadir(args.datadir)
    with tempfile.TemporaryDirectory() as tmp:
        if not Path(args.datadir).is_dir():
            from nerf.demo_scene import ensure_demo_scene

            measured_on = f"the demo scene ({args.datadir} not found)"
            args.dataset_type, args.datadir, args.half_res = "demo", str(Path(tmp) / "demo"), False
            ensure_demo_scene(args.datadir, verbose=False, n_train=10, n_val=1, n_test=1)   # 64,000 rays
        device = flags.choose_device(args.device)
        scene = load_scene(args)
        kw_train, kw_test, _, _, optimizer = run_nerf.create_nerf(args, device)
        for kw in (kw_train, kw_test):
            kw.update(near=scene.near, far=scene.far)
        sampler = run_nerf.make_sampler(args, scene, device)
        run_nerf.train_step(*sampler(1), scene, kw_train, optimizer, args.chunk)
        _sync(device)
        start = time.perf_counter()
        for i in range(2, n_steps + 2):
            run_nerf.train_step(*sampler(i), scene, kw_train, optimizer, args.chunk)
        _sync(device)
        step_s = (time.perf_counter() - start) / n_steps
        rays, _ = sampler(n_steps + 2)
        with torch.no_grad():
            start = time.perf_counter()
            render(scene.H, scene.W, scene.K, chunk=args.chunk, rays=rays, **kw_test)
            _sync(device)
        ray_s = (time.perf_counter() - start) / rays.shape[1]
    return Timing(step_s, ray_s, measured_on)


def rays_to_render(scene: Scene) -> tuple[int, str]:
    """Rays of the test set (and the spiral video, when due at the last step)
    and how they add up; (0, reason) without the data."""
    from load_llff import list_images

    args = scene.args
    if not Path(args.datadir).is_dir():
        return 0, "render time not estimated: no data"
    H, W = data_checks.check_data(args)
    if args.dataset_type in ("blender", "demo", "LINEMOD"):
        frames = read_transforms(Path(args.datadir), "test")["frames"]
        views = len(frames[::max(args.testskip, 1)])
        path_frames = 40
    else:
        images = len(list_images(Path(args.datadir) / f"images_{args.factor}"))
        views = len(range(0, images, args.llffhold)) if args.llffhold > 0 else 1
        path_frames = 120
    video = path_frames if scene.steps % args.i_video == 0 else 0
    return (views + video) * H * W, f"{views} test views{f' + {video} video frames' if video else ''} of {W}x{H}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def dry_run(scenes: list[Scene], n_steps: int, n_gpus: int) -> None:
    """Prints each scene's state and estimated time; timings are measured once
    per set of step-cost settings, on --device (the default device without)."""
    device = flags.choose_device(scenes[0].args.device)
    timings: dict[tuple, Timing] = {}
    total = 0.0
    print(f"Plan: {len(scenes)} scenes on {device}"
          f"{f', one per GPU on {n_gpus} GPUs' if n_gpus > 1 else ', one after another'}; "
          f"timing {n_steps} training steps per setting", flush=True)
    for k, scene in enumerate(scenes):
        head = f"[{k + 1}/{len(scenes)}] {scene.name} ({scene.config}):"
        if scene.scores() is not None:
            print(f"{head} finished at step {scene.steps}: skipped", flush=True)
            continue
        trained = scene.steps_trained()
        if trained > scene.steps:
            print(f"{head} holds step {trained}, past {scene.steps}: would fail", flush=True)
            continue
        key = tuple(getattr(scene.args, f) for f in _STEP_COST_FLAGS)
        try:
            if key not in timings:
                print(f"{head} timing {n_steps} training steps and a test render with its settings "
                      f"(N_rand {scene.args.N_rand}, {scene.args.N_samples} + {scene.args.N_importance} samples) "
                      f"on {device} ...", flush=True)
                timings[key] = time_steps(scene.args, n_steps)
            rays, what = rays_to_render(scene)
        except DataError as err:
            print(f"{head} error: {err}", flush=True)
            continue
        timing = timings[key]
        left = scene.steps - trained
        seconds = left * timing.step_s + rays * timing.ray_s
        total += seconds
        render = f"{what} x {timing.ray_s * 1e6:.2f} us/ray" if rays else f"({what})"
        print(f"{head} {trained} of {scene.steps} steps done; {left} steps x {timing.step_s:.3f} s/step + "
              f"{render} = ~{_duration(seconds)} (timed on {timing.measured_on})", flush=True)
    spread = f" (~{_duration(total / n_gpus)} on {n_gpus} GPUs)" if n_gpus > 1 else ""
    print(f"Total: ~{_duration(total)} on one {device.type} device{spread}; an estimate "
          "from the steps timed here", flush=True)


# --- Command line -------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train, render and score the paper's scenes; write results/paper_table.{md,json}. "
                    "Other flags go to every run_nerf.py call.", allow_abbrev=False)
    parser.add_argument("--configs", nargs="+", required=True, metavar="CONFIG",
                        help="run_nerf.py config files, e.g. configs/paper/*.txt")
    parser.add_argument("--steps", type=int, help="training steps per scene instead of each config's N_iters")
    parser.add_argument("--results", default="results", help="folder for paper_table.md and .json (%(default)s)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan with estimated times; train nothing")
    parser.add_argument("--dry_run_steps", type=int, default=5, help="training steps timed per setting (%(default)s)")
    opts, run_nerf_args = parser.parse_known_args(argv)
    if opts.steps is not None and opts.steps < 1:
        raise DataError("--steps", f"must be at least 1, got {opts.steps}")
    if opts.dry_run_steps < 1:
        raise DataError("--dry_run_steps", f"must be at least 1, got {opts.dry_run_steps}")
    return opts, run_nerf_args


def report_lpips(scenes: list[Scene]) -> None:
    """Says whether the tables will have LPIPS, fetching its weights once
    here rather than in each scene's run (the model is built on the CPU and
    let go)."""
    download = lpips_vgg.downloads_allowed(any(s.args.no_download for s in scenes))
    lpips = lpips_vgg.LPIPSScorer(device="cpu", download=download)
    print("LPIPS: available" if lpips.available else f"LPIPS: unavailable: {lpips.reason}", flush=True)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def on_hang_up(signum, frame) -> None:
    """The terminal is gone: what would be printed is dropped (each scene's
    log keeps its output); the scene in training got the hang-up too, saves
    and stops, and no further scene starts."""
    sys.stdout = sys.stderr = open(os.devnull, "w")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous = signal.signal(signal.SIGHUP, on_hang_up) if hasattr(signal, "SIGHUP") else None
    try:
        opts, run_nerf_args = parse_args(argv)
        scenes = load_scenes(opts.configs, run_nerf_args, opts.steps)
        n_gpus = gpu_count()
        if opts.dry_run:
            dry_run(scenes, opts.dry_run_steps, n_gpus)
            return 0
        report_lpips(scenes)
        finished = run_all(scenes, run_nerf_args, n_gpus)
        md_path, json_path = write_table(scenes, Path(opts.results), opts.steps)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted between scenes; run the same command again to go on", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
    print(f"Wrote {md_path} and {json_path} ({sum(finished)} of {len(scenes)} scenes finished)", flush=True)
    return 0 if all(finished) else 1


if __name__ == "__main__":
    sys.exit(main())
