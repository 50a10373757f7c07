"""Steady-state speed of training steps and full-image renders.

    python bench.py                                  # fern, small networks: ~30-45 s (longer when the CPU is shared)
    python bench.py --baseline                       # and the original's code path, interleaved
    python bench.py --plain                          # and this library's plain (unfused) MLP path
    python bench.py --as_is --steps 3 --render_frames 0          # configs/fern.txt unchanged
    python bench.py --config configs/lego.txt --baseline --render_frames 0
    python bench.py --threads 1 -- --N_rand 2048     # after --: run_nerf flags
    python bench.py --config configs/lego.txt --sampler both     # both samplers, interleaved
    python bench.py --config configs/lego.txt --as_is --sampler both --steps 4 --render_factor 4 \
        -- --ft_path logs/lego_test/200000.tar          # a trained network (and its grid, if it has one)

Prints steps/s, rays/s, network queries per ray (the points that the
step's renders send through the networks, coarse + fine, divided by its
rays; counted as the queries happen, the same way for every sampler),
peak memory and the MLPs' arithmetic rate: their FLOPs counted from the layer sizes
(forward 2 x in x out per point per layer, backward twice that, whatever the
implementation actually skips; for a rendered frame the coarse network up to
sigma, all that a frame needs of it, for the original's too) times the
points counted, over the measured time, as a fraction of a
plain float32 matrix multiply's rate measured in the same run on the same
device. Next to it, the bound set by the step's (and a rendered ray's)
matrix products alone: the same products on random operands of the same
shapes, in the fast path's blocks, with nothing else around them (for the
occupancy sampler, whose rays keep a varying number of samples, the shapes
of one counted step, and of the first rendered frame). Timings
are medians over many steps after warm-up; with --baseline (or --sampler
both) the implementations alternate in short rounds, with matmul and products probes
in between, so a change in machine load hits all of them alike.

`--sampler occupancy` (or `both`: occupancy and the default hierarchical
sampler, their ratio printed) times steady-state steps through a built
occupancy grid: a checkpoint's grid (`-- --ft_path F`), else one built from
the checkpoint's networks, else one built from the fresh networks after the
warm-up steps; `--grid_from F` takes F's grid with the benchmark's own
networks (the empty space another run of the same scene learnt, for
networks nobody has trained: the paper's, say). A fresh network's grid
holds most of the box, so its figures
are a lower bound of what a trained network's grid gives (the output says
which grid it timed and how full it is). The grid's upkeep (one update
every --occupancy_interval steps) is timed once a round and its share
added to the step time. The occupancy flags (--occupancy_resolution, ...)
go after `--`.

`--small` (the default unless --as_is) is the issue's small configuration:
networks 4 x 64, --N_rand 512 --N_samples 32 --N_importance 32.
"""
import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from nerf import fast_mlp, flags, occupancy  # noqa: E402
import run_nerf  # noqa: E402
from benchmarks import original_path as orig  # noqa: E402
from nerf.checkpoints import find_checkpoint, read_checkpoint  # noqa: E402
from nerf.datasets import load_scene  # noqa: E402
from nerf.errors import DataError, exit_status  # noqa: E402
from nerf.rendering import accepts_density_only, render, scaled_intrinsics  # noqa: E402
from run_nerf_helpers import default_device, keep_freed_memory  # noqa: E402

SMALL = ["--netdepth", "4", "--netwidth", "64", "--netdepth_fine", "4", "--netwidth_fine", "64",
         "--N_rand", "512", "--N_samples", "32", "--N_importance", "32"]
SAMPLERS = {"hierarchical": ("hierarchical",), "occupancy": ("occupancy",), "both": ("occupancy", "hierarchical")}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "fern.txt"))
    p.add_argument("--as_is", action="store_true", help="use the config's networks and sampling unchanged")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--round", type=int, default=5, help="steps per round when alternating")
    p.add_argument("--render_frames", type=int, default=1, help="timed full-image renders (0: none)")
    p.add_argument("--render_factor", type=int, default=0, help="render at 1/N of the size")
    p.add_argument("--baseline", action="store_true", help="also time the original's code path")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="which sampler's steps and renders to time; both: occupancy and hierarchical, interleaved "
                        "(default: run_nerf's --sampler after --, hierarchical)")
    p.add_argument("--plain", action="store_true",
                   help="also time this library with its plain MLP path (run_network fast=False)")
    p.add_argument("--grid_from", default=None,
                   help="the occupancy sampler marches through this checkpoint's grid (another run of the same "
                        "scene, with the same --occupancy_resolution), with the benchmark's own networks")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.error = bad_flag      # a bad value is one line, exit status 2
    args, rest = p.parse_known_args(argv)
    rest = [r for r in rest if r != "--"]
    return args, rest


def bad_flag(message: str):
    """argparse's complaint as a DataError: one line, exit status 2."""
    raise DataError("bench.py", message)


def run_flags(bargs, rest: List[str]):
    """run_nerf's flags for the benchmark (the config, the small networks
    unless --as_is, the flags after --), checked as run_nerf checks them;
    bench.py's --sampler is run_nerf's --sampler, given once."""
    if bargs.sampler is not None and any(r == "--sampler" or r.startswith("--sampler=") for r in rest):
        raise DataError("--sampler", "given both before and after --: give it once (bench.py's --sampler also "
                                     "takes 'both')")
    run_argv = ["--config", bargs.config] + ([] if bargs.as_is else SMALL) + rest + ["--no_reload"]
    args = flags.parse_args(run_nerf.config_parser(), run_argv)
    samplers = SAMPLERS[bargs.sampler or args.sampler]
    args.sampler = samplers[0]
    return args, samplers


def resolve_datadir(datadir: str) -> str:
    """The config's ./data/... path, else the same scene under $NERF_DATA or ../shared/data."""
    if Path(datadir).is_dir():
        return datadir
    parts = Path(datadir).parts
    if "data" in parts:
        tail = Path(*parts[parts.index("data") + 1:])
        for root in (os.environ.get("NERF_DATA"), REPO.parent / "shared" / "data"):
            if root and (Path(root) / tail).is_dir():
                return str(Path(root) / tail)
    return datadir


def layer_shapes(model, density_only: bool = False) -> List[Tuple[int, int, int]]:
    """(inputs, outputs, input-gradient columns) of each of the MLP's layers,
    with `density_only` the layers up to sigma. Input gradients as the fast
    path computes them: none for the encoded points (the first layer's input
    and the skip layer's encoding columns) nor for the encoded view direction.
    (Its backward also fuses the feature and alpha layers into one product of
    W + 1 rows; here they stay apart.)"""
    shapes = [(l.in_features, l.out_features, model.W if k else 0) for k, l in enumerate(model.pts_linears)]
    if model.use_viewdirs and density_only:
        shapes.append((model.W, 1, model.W))
    elif model.use_viewdirs:
        W = model.W
        views = model.views_linears[0]
        shapes += [(W, W, W), (W, 1, W), (views.in_features, views.out_features, W),
                   (model.rgb_linear.in_features, model.rgb_linear.out_features, model.rgb_linear.in_features)]
    else:
        shapes.append((model.W, model.output_linear.out_features, model.W))
    return shapes


class Products:
    """The MLPs' matrix products alone, on random operands of a step's shapes,
    in the fast path's netchunk chunks and blocks: forward products and, with
    `train`, weight and input gradients. No bias, no activation, no encoding,
    no sampling: the time these products take as bench.py issues them, a
    bound for an implementation that does them this way on this device."""

    def __init__(self, jobs, device, train: bool, netchunk: int):
        """jobs: (model, points, samples per ray, density only) for each network evaluation."""
        self.train, self.device, self.jobs, self.times = train, device, [], []
        for model, points, S, density_only in jobs:
            chunk = min(points, max(1, netchunk // S) * S)
            rows = min(chunk, fast_mlp.rows_per_block(model, S, device))
            ops = []
            for cin, cout, gin in layer_shapes(model, density_only):
                x, w = torch.randn(rows, cin, device=device), torch.randn(cout, cin, device=device)
                y = torch.empty(rows, cout, device=device)
                grads = None
                if train:
                    grads = (torch.randn(rows, cout, device=device), torch.zeros(cout, cin, device=device),
                             torch.empty(rows, gin, device=device) if gin else None)
                ops.append((x, w, y, grads))
            self.jobs.append((points, chunk, rows, ops))

    def run(self):
        for points, chunk, rows, ops in self.jobs:
            for c in range(0, points, chunk):
                in_chunk = min(chunk, points - c)
                for a in range(0, in_chunk, rows):
                    n = min(rows, in_chunk - a)
                    for x, w, y, grads in ops:
                        torch.mm(x[:n], w.t(), out=y[:n])
                        if grads is not None:
                            g, gw, gx = grads
                            gw.addmm_(g[:n].t(), x[:n])
                            if gx is not None:
                                torch.mm(g[:n], w[:, :gx.shape[1]], out=gx[:n])

    def probe(self):
        sync(self.device)
        t = time.perf_counter()
        self.run()
        sync(self.device)
        self.times.append(time.perf_counter() - t)


def network_jobs(args, kw, n_rays: int, train: bool):
    """(model, points, samples per ray, density only) of the network
    evaluations for n_rays rays; a render (not `train`) asks the coarse
    network for densities only, as `render_path` does."""
    coarse, fine = kw["network_fn"], kw["network_fine"]
    jobs = [(coarse, n_rays * args.N_samples, args.N_samples, not train and args.N_importance > 0)]
    if args.N_importance > 0:
        S = args.N_samples + args.N_importance
        jobs.append((fine if fine is not None else coarse, n_rays * S, S, False))
    return jobs


def forward_flops(jobs) -> float:
    """Forward FLOPs of network evaluations (model, points, samples per ray,
    density only), 2 x in x out per point per layer (up to sigma for a
    density-only one)."""
    return sum(points * sum(2 * cin * cout for cin, cout, _ in layer_shapes(model, density_only))
               for model, points, _, density_only in jobs)


def forward_flops_per_ray(args, kw, train: bool = True) -> float:
    """Forward FLOPs of one ray's network evaluations with the hierarchical
    sampler; for a rendered frame (not `train`) the coarse network counts
    only up to sigma, all that a frame needs of it."""
    return forward_flops(network_jobs(args, kw, 1, train))


def samples_per_ray(args) -> int:
    """The hierarchical sampler's network queries per ray: N_samples coarse, N_samples + N_importance fine."""
    return args.N_samples + ((args.N_samples + args.N_importance) if args.N_importance > 0 else 0)


class QueryCount:
    """The points that renders send through the networks, as the jobs
    (model, points, samples per ray, density only) of `network_jobs`: a
    query of inputs (N, S, 3) adds N x S points to its job. The same count
    for every sampler (the occupancy sampler's packed points come as
    (P, 1, 3)); shapes are on the host, so counting synchronises nothing."""

    def __init__(self):
        self.jobs = {}

    def wrap(self, query: Callable, sigma_only=None) -> Callable:
        """`query` counted; it takes `density_only` where `query` does. The
        queries of model `sigma_only` count as density-only (the original's
        renders compute the coarse colour too, which no frame uses)."""
        if accepts_density_only(query):
            def counted(inputs, viewdirs, network_fn, density_only=False):
                self.add(network_fn, inputs, density_only or network_fn is sigma_only)
                return query(inputs, viewdirs, network_fn, density_only=density_only)
        else:
            def counted(inputs, viewdirs, network_fn):
                self.add(network_fn, inputs, network_fn is sigma_only)
                return query(inputs, viewdirs, network_fn)
        return counted

    def add(self, model, inputs: torch.Tensor, density_only: bool) -> None:
        N, S = inputs.shape[0], inputs.shape[1]
        key = (id(model), S, density_only)
        points = self.jobs[key][1] if key in self.jobs else 0
        self.jobs[key] = (model, points + N * S, S, density_only)

    def take(self) -> list:
        """The jobs counted since the last `take`, in the order first queried."""
        jobs, self.jobs = list(self.jobs.values()), {}
        return jobs


def points(jobs) -> int:
    return sum(n for _, n, _, _ in jobs)


def sync(device):
    """Waits for the device's queued work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


class Matmul:
    """Plain float32 square matrix products on the device: the reference rate."""

    def __init__(self, device):
        n = 4096 if device.type == "cuda" else 2048
        self.a = torch.randn(n, n, device=device)
        self.b = torch.randn(n, n, device=device)
        self.flops = 2 * n ** 3
        self.device = device
        self.rates = []
        self.probe()

    def probe(self, reps: int = 3):
        best = float("inf")
        for _ in range(reps):
            sync(self.device)
            t = time.perf_counter()
            torch.mm(self.a, self.b)
            sync(self.device)
            best = min(best, time.perf_counter() - t)
        self.rates.append(self.flops / best)


def peak_memory_start(device):
    """Resets the peak. On the CPU the memory an earlier implementation freed
    is first handed back to the system (keep_freed_memory holds on to it), so
    that it does not count in the next one's peak resident size."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Impl:
    """One implementation's training state: sampler, networks, optimizer,
    step, the count of its network queries and (occupancy sampler) its grid."""

    def __init__(self, name, sampler, step_fn, render_fn, device_ctx, count: QueryCount, kw_train=None, start=0):
        self.name, self.sampler, self.step_fn, self.render_fn = name, sampler, step_fn, render_fn
        self.device_ctx, self.count, self.kw_train = device_ctx, count, kw_train
        self.grid = (kw_train or {}).get("occupancy")
        self.grid_note = None
        self.grid_source = None        # --grid_from's checkpoint
        self.step_times, self.render_times, self.upkeep_times = [], [], []
        self.step_jobs, self.render_jobs = [], []     # the counted jobs of each timed step and frame
        self.products = self.render_products = None
        self.last_jobs = []
        self.i = start
        self.peak = None

    def step(self, device, timed: bool = True) -> float:
        self.i += 1
        self.count.take()
        sync(device)
        t = time.perf_counter()
        with self.device_ctx():
            batch_rays, target_s = self.sampler(self.i)
            self.step_fn(batch_rays, target_s, self.i)
        sync(device)
        t = time.perf_counter() - t
        self.last_jobs = self.count.take()
        if timed:
            self.step_times.append(t)
            self.step_jobs.append(self.last_jobs)
        return t

    def render(self, H: int, W: int, K, c2w, device) -> None:
        self.count.take()
        sync(device)
        t = time.perf_counter()
        self.render_fn(H, W, K, c2w)
        sync(device)
        self.render_times.append(time.perf_counter() - t)
        self.render_jobs.append(self.count.take())

    def upkeep(self, device) -> None:
        """One timed update of the occupancy grid (training does one every
        --occupancy_interval steps). A grid taken with --grid_from is put
        back afterwards: updated from the benchmark's untrained networks it
        would drift toward their fog, and the steps are to be timed through
        the learnt grid."""
        kept = None
        if self.grid_source is not None:
            kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.grid.state_dict().items()}
        sync(device)
        t = time.perf_counter()
        self.grid.update(occupancy.network_density(self.kw_train))
        sync(device)
        self.upkeep_times.append(time.perf_counter() - t)
        self.count.take()
        if kept is not None:
            self.grid.load_state_dict(kept, self.grid_source)

    def upkeep_per_step(self) -> float:
        return median(self.upkeep_times) / self.grid.interval if self.grid is not None else 0.0


def occupied_share(grid: occupancy.OccupancyGrid) -> float:
    """The share of the cells some training camera sees that the grid marks occupied."""
    return float(grid.binary.sum()) / max(1.0, float(grid.visible.sum()))


def take_grid(impls: List["Impl"], path: Path) -> None:
    """`--grid_from`: each occupancy implementation's grid becomes the one
    saved in the checkpoint at `path` (its estimates, observations and
    generator; the networks stay the benchmark's, and `Impl.upkeep` puts
    the grid back after each timed update). DataError, naming the file,
    when it holds no grid or one that does not fit, and when no
    implementation marches through a grid."""
    if all(impl.grid is None for impl in impls):
        raise DataError("--grid_from", "only the occupancy sampler marches through a grid: add --sampler occupancy "
                                       "or --sampler both")
    state = read_checkpoint(path).get(occupancy.CHECKPOINT_KEY)
    if state is None:
        raise DataError(path, "holds no occupancy grid (trained with the default sampler); --grid_from takes a "
                              "checkpoint of an occupancy run")
    for impl in impls:
        if impl.grid is None:
            continue
        if not impl.grid.load_state_dict(state, path) or not impl.grid.ready:
            raise DataError(path, "its occupancy grid does not fit this run (another resolution or box, damaged, or "
                                  "not built yet)")
        impl.grid_source = path


def ready_grid(impl: Impl, warmup: int, device, ckpt_path) -> str:
    """Makes sure `impl`'s grid is built, before any step is timed: the
    checkpoint's grid, else one built from the checkpoint's networks, else,
    after `warmup` untimed steps (sampled as the default does, since the
    grid is not built yet), one built from the fresh networks. Returns how
    the grid was obtained, in words."""
    grid = impl.grid
    if grid.ready:
        return f"the grid saved in {impl.grid_source or ckpt_path}"
    if ckpt_path is None:
        for _ in range(warmup):
            impl.step(device, timed=False)
    t = time.perf_counter()
    grid.build(occupancy.network_density(impl.kw_train))
    impl.count.take()
    built = f"{grid.resolution}^3 cells, built in {time.perf_counter() - t:.1f} s"
    if ckpt_path is not None:
        return f"built from the networks of {ckpt_path} (it holds no grid; {built})"
    return (f"built from fresh networks after {warmup} warm-up steps ({built}): a fresh network's grid holds most "
            f"of the box, so these figures are a lower bound of a trained network's")


def build(args, scene, device, samplers, baseline: bool, plain: bool = False, ckpt=None, ckpt_path=None):
    """This library's implementation with each of `samplers` and, with
    `plain` / `baseline`, its plain MLP path and the original's code path
    (both hierarchical), all with equal initial weights (the checkpoint's
    when given, and its grid). Returns the implementations and the
    hierarchical sampler's training render kwargs."""
    bounds = {"near": scene.near, "far": scene.far}
    kws = {}
    for sampler in dict.fromkeys(samplers + (("hierarchical",) if plain or baseline else ())):
        torch.manual_seed(0)
        np.random.seed(0)
        kw_train, kw_test, start, _, optimizer = run_nerf.create_nerf(args, device, ckpt, ckpt_path, search=False)
        kw_train.update(bounds)
        kw_test.update(bounds)
        occupancy.attach(argparse.Namespace(**{**vars(args), "sampler": sampler}), scene, kw_train, kw_test, ckpt,
                         ckpt_path, device, rendering_only=False)
        kws[sampler] = (kw_train, kw_test, start, optimizer)

    fast = "bf16" if args.mixed_precision else "compiled" if args.compile else "fast"
    fast = "hierarchical" if len(samplers) > 1 else fast      # the samplers compared
    impls = [library_impl("occupancy" if sampler == "occupancy" else fast, args, scene,
                          run_nerf.make_sampler(args, scene, device), *kws[sampler]) for sampler in samplers]
    if plain or baseline:
        kw_train, kw_test, start, _ = kws["hierarchical"]
        if plain:
            impls.append(build_plain(args, scene, device, kw_train, kw_test, start))
        if baseline:
            impls.append(build_original(args, scene, device, kw_train, kw_test, start))
    return impls, kws.get("hierarchical", kws[samplers[0]])[0]


def build_plain(args, scene, device, kw_train, kw_test, start=0):
    """The library with `run_network(..., fast=False)`: its MLP as `NeRF.forward` computes it."""
    import copy
    from nerf.rendering import run_network
    coarse = copy.deepcopy(kw_train["network_fn"])
    fine = copy.deepcopy(kw_train["network_fine"])
    e_fn, _ = run_nerf.get_embedder(args.multires, args.i_embed)
    e_dirs = run_nerf.get_embedder(args.multires_views, args.i_embed)[0] if args.use_viewdirs else None
    e_fn = e_fn.to(device)
    e_dirs = e_dirs.to(device) if e_dirs is not None else None

    def query(inputs, viewdirs, fn, density_only=False):
        return run_network(inputs, viewdirs, fn, e_fn, e_dirs, args.netchunk, fast=False, density_only=density_only)

    swap = {"network_fn": coarse, "network_fine": fine, "network_query_fn": query}
    kw_tr, kw_te = {**kw_train, **swap}, {**kw_test, **swap}
    params = list(coarse.parameters()) + (list(fine.parameters()) if fine is not None else [])
    optimizer = torch.optim.Adam(params=params, lr=args.lrate, betas=(0.9, 0.999))
    return library_impl("plain", args, scene, run_nerf.make_sampler(args, scene, device), kw_tr, kw_te, start,
                        optimizer)


def library_impl(name, args, scene, sampler, kw_train, kw_test, start, optimizer) -> "Impl":
    """Training steps and renders through run_nerf's own train_step and
    render, their network queries counted."""
    count = QueryCount()
    kw_train["network_query_fn"] = count.wrap(kw_train["network_query_fn"])
    kw_test["network_query_fn"] = count.wrap(kw_test["network_query_fn"])

    def step(batch_rays, target_s, i):
        run_nerf.train_step(batch_rays, target_s, scene, kw_train, optimizer, args.chunk)
        for group in optimizer.param_groups:
            group["lr"] = run_nerf.learning_rate(args, i - 1)

    def render_fn(H, W, K, c2w):          # as render_path renders a frame
        with torch.no_grad():
            return render(H, W, K, chunk=args.chunk, c2w=c2w, coarse_maps=False, **kw_test)

    return Impl(name, sampler, step, render_fn, lambda: _null(), count, kw_train, start)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_original(args, scene, device, kw_train, kw_test, start=0):
    def twin(model):
        if model is None:
            return None
        t = orig.OriginalNeRF(D=model.D, W=model.W, input_ch=model.input_ch, input_ch_views=model.input_ch_views,
                              output_ch=(model.output_linear.out_features if not model.use_viewdirs else 4),
                              skips=model.skips, use_viewdirs=model.use_viewdirs).to(device)
        orig.load_matching_state(t, model.state_dict())
        return t

    coarse, fine = twin(kw_train["network_fn"]), twin(kw_train["network_fine"])
    params = list(coarse.parameters()) + (list(fine.parameters()) if fine is not None else [])
    optimizer = torch.optim.Adam(params=params, lr=args.lrate, betas=(0.9, 0.999))
    embed = orig.OriginalEmbedder(args.multires) if args.i_embed == 0 else (lambda x: x)
    embeddirs = None
    if args.use_viewdirs:
        embeddirs = orig.OriginalEmbedder(args.multires_views) if args.i_embed == 0 else (lambda x: x)
    count = QueryCount()

    def query(inputs, viewdirs, fn):
        return orig.run_network(inputs, viewdirs, fn, embed, embeddirs, args.netchunk)

    swap = {"network_fn": coarse, "network_fine": fine, "network_query_fn": count.wrap(query)}
    kw_tr = {**kw_train, **swap}
    kw_te = {**kw_test, **swap, "network_query_fn": count.wrap(query, sigma_only=coarse if fine else None)}
    with torch.device(device):
        sampler = orig.OriginalSampler(np.asarray(scene.images), scene.poses, scene.i_train, scene.H, scene.W,
                                       scene.K, args.N_rand, args.no_batching,
                                       args.precrop_iters, args.precrop_frac)

    def step(batch_rays, target_s, i):
        orig.train_step(scene.H, scene.W, scene.K, args.chunk, batch_rays, target_s, kw_tr, optimizer)
        for group in optimizer.param_groups:
            group["lr"] = run_nerf.learning_rate(args, i - 1)

    def render_fn(H, W, K, c2w):
        with torch.no_grad(), torch.device(device):
            return orig.render(H, W, K, chunk=args.chunk, c2w=c2w, **kw_te)

    return Impl("baseline", sampler, step, render_fn, lambda: torch.device(device), count, start=start)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    bargs, rest = parse(argv)
    keep_freed_memory()   # as run_nerf.main does
    if bargs.threads:
        torch.set_num_threads(bargs.threads)
    if bargs.render_factor < 0:
        raise DataError("--render_factor", f"must be 0 (full size) or more, got {bargs.render_factor}")
    args, samplers = run_flags(bargs, rest)
    args.datadir = resolve_datadir(args.datadir)
    device = default_device()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    scene = load_scene(args)
    ckpt_path, ckpt = find_checkpoint(Path(args.basedir) / str(args.expname), args.ft_path, no_reload=True)
    impls, kw_train = build(args, scene, device, samplers, bargs.baseline, bargs.plain, ckpt, ckpt_path)
    if bargs.grid_from:
        take_grid(impls, Path(bargs.grid_from))
    setup_s = time.perf_counter() - t0
    setup_rss = peak_memory_bytes(torch.device("cpu"))
    mm = Matmul(device)
    f = bargs.render_factor
    H, W, K = (scene.H // f, scene.W // f, scaled_intrinsics(scene.K, f)) if f else (scene.H, scene.W, scene.K)
    hierarchical = [impl for impl in impls if impl.grid is None]
    step_products = render_products = None
    render_rays_probe = min(H * W, 4096)
    if hierarchical:
        step_products = Products(network_jobs(args, kw_train, args.N_rand, train=True), device, True, args.netchunk)
        render_products = Products(network_jobs(args, kw_train, render_rays_probe, train=False), device, False,
                                   args.netchunk)
        for impl in hierarchical:
            impl.products, impl.render_products = step_products, render_products

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"config {bargs.config}{'' if bargs.as_is else ' + small networks'} {' '.join(rest)}: "
          f"{args.netdepth}x{args.netwidth} / {args.netdepth_fine}x{args.netwidth_fine}, N_rand {args.N_rand}, "
          f"N_samples {args.N_samples} + N_importance {args.N_importance}, viewdirs {args.use_viewdirs}, "
          f"{'no_batching' if args.no_batching else 'batching'}, image {scene.H}x{scene.W}, "
          f"sampler {' and '.join(samplers)}{f', networks from {ckpt_path}' if ckpt_path else ''}  "
          f"(setup {setup_s:.1f} s)")
    data_bytes, device_bytes = impls[0].sampler.bytes_per_pixel, impls[0].sampler.device_bytes_per_pixel
    print(f"training data: {data_bytes:.2f} bytes per training pixel ({device_bytes:.2f} on the device; "
          f"{len(scene.i_train)} images), peak RSS of loading the scene and building it {setup_rss / 2 ** 20:.0f} MiB")

    # Warm-up, one implementation after the other (peak memory measured here): the
    # fast path last, as its pool stays allocated. An occupancy grid is built first.
    for impl in reversed(impls):
        if impl.grid is not None:
            impl.grid_note = ready_grid(impl, bargs.warmup, device, ckpt_path)
            print(f"[{impl.name}] occupancy grid: {impl.grid_note}; {100 * occupied_share(impl.grid):.1f}% of the "
                  f"cells the cameras see are occupied")
        peak_memory_start(device)
        for _ in range(bargs.warmup):
            impl.step(device, timed=False)
        impl.peak = peak_memory_bytes(device)
        if impl.grid is not None:      # its products: the shapes of a step through the grid
            impl.step(device, timed=False)
            impl.products = Products(impl.last_jobs, device, True, args.netchunk)
    for impl in impls[1:]:      # their freed memory was handed back: fault it in again, untimed
        impl.step(device, timed=False)
    # Timed steps, alternating in rounds with matmul, products and grid upkeep probes between.
    products = list({id(impl.products): impl.products for impl in impls}.values())
    done = 0
    while done < bargs.steps:
        n = min(bargs.round, bargs.steps - done)
        for impl in impls:
            for _ in range(n):
                impl.step(device)
            if impl.grid is not None:
                impl.upkeep(device)
        mm.probe()
        for probe in products:
            probe.probe()
        done += n

    results = {"device": str(device), "threads": torch.get_num_threads(), "load_before": load0,
               "config": bargs.config, "small": not bargs.as_is, "extra_args": rest, "samplers": list(samplers),
               "checkpoint": str(ckpt_path) if ckpt_path else None, "grid_from": bargs.grid_from,
               "train_bytes_per_pixel": data_bytes, "train_device_bytes_per_pixel": device_bytes,
               "setup_peak_rss_mb": setup_rss / 2 ** 20}

    # Full-image renders (the first test view), alternating.
    if bargs.render_frames > 0:
        pose = torch.as_tensor(scene.poses[scene.i_test[0]][:3, :4], device=device)
        for _ in range(bargs.render_frames):
            for impl in impls:
                impl.render(H, W, K, pose, device)
                if impl.render_products is None:     # the shapes of its first frame, for the probe's rays
                    impl.render_products = Products([(m, n * render_rays_probe // (H * W), S, d)
                                                     for m, n, S, d in impl.render_jobs[0]], device, False,
                                                    args.netchunk)
            mm.probe()
            for probe in {id(impl.render_products): impl.render_products for impl in impls}.values():
                for _ in range(3):
                    probe.probe()

    mm_rate = median(mm.rates)
    print(f"plain float32 matmul: {mm_rate / 1e9:.1f} GFLOP/s (median of {len(mm.rates)} probes, "
          f"range {min(mm.rates) / 1e9:.1f}-{max(mm.rates) / 1e9:.1f})")
    print("MLP work: FLOPs from the layer sizes times the points each step (frame) sent through the networks, "
          "counted as they went (training: 3x forward)")
    results["matmul_gflops"] = mm_rate / 1e9
    for impl in impls:
        results[impl.name] = report(impl, args, H, W, mm_rate, render_rays_probe, device)
    first = results[impls[0].name]
    for other in impls[1:]:
        b = results[other.name]
        line = f"{impls[0].name} vs {other.name} (same run): training {b['step_s'] / first['step_s']:.2f}x the steps/s"
        if b["queries_per_ray"] != first["queries_per_ray"]:
            line += f", {b['queries_per_ray'] / first['queries_per_ray']:.2f}x fewer network queries a ray"
        if "render_s" in first:
            line += f", render {b['render_s'] / first['render_s']:.2f}x"
        print(line)
    load1 = os.getloadavg()
    results["load_after"] = load1
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if bargs.json:
        with open(bargs.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def report(impl: Impl, args, H: int, W: int, mm_rate: float, render_rays_probe: int, device) -> dict:
    """Prints and returns one implementation's figures: the median step (plus
    its share of the grid's upkeep), its network queries a ray and FLOPs
    (mean over the timed steps: with the occupancy sampler they vary), its
    products' bound; likewise for its frames."""
    t_step = median(impl.step_times)
    upkeep = impl.upkeep_per_step()
    t = t_step + upkeep
    queries = statistics.mean(points(jobs) for jobs in impl.step_jobs) / args.N_rand
    flops = 3 * statistics.mean(forward_flops(jobs) for jobs in impl.step_jobs)
    t_products = median(impl.products.times)
    r = {"step_s": t, "steps_per_s": 1 / t, "rays_per_s": args.N_rand / t, "queries_per_ray": queries,
         "samples_per_s": args.N_rand * queries / t, "step_gflop": flops / 1e9, "mlp_gflops": flops / t / 1e9,
         "fraction_of_matmul": flops / t / mm_rate, "products_step_s": t_products,
         "fraction_of_products_bound": t_products / t, "peak_memory_mb": impl.peak / 2 ** 20,
         "step_times": impl.step_times}
    if impl.grid is not None:
        r.update(grid=impl.grid_note, grid_occupied=occupied_share(impl.grid), step_s_without_upkeep=t_step,
                 upkeep_s=median(impl.upkeep_times), upkeep_share=upkeep / t)
        print(f"[{impl.name:8s}] grid upkeep: {median(impl.upkeep_times):.3f} s an update, one every "
              f"{impl.grid.interval} steps = {100 * upkeep / t:.1f}% of a step (included below)")
    print(f"[{impl.name:8s}] train: {1 / t:7.2f} steps/s  {args.N_rand / t:9.0f} rays/s  {queries:6.1f} queries/ray  "
          f"MLP {flops / 1e9:.2f} GFLOP/step, {flops / t / 1e9:6.1f} GFLOP/s = {100 * flops / t / mm_rate:5.1f}% of "
          f"matmul; products alone {1e3 * t_products:.1f} ms = {100 * t_products / t:5.1f}% of the step  "
          f"(median of {len(impl.step_times)} steps, peak {'RSS' if device.type == 'cpu' else 'allocated'} "
          f"{impl.peak / 2 ** 20:.0f} MiB)")
    if impl.render_times:
        tr = median(impl.render_times)
        rflops = statistics.mean(forward_flops(jobs) for jobs in impl.render_jobs)
        rqueries = statistics.mean(points(jobs) for jobs in impl.render_jobs) / (H * W)
        rays_s = H * W / tr
        products_rays = render_rays_probe / median(impl.render_products.times)
        r.update(render_s=tr, render_rays_per_s=rays_s, render_queries_per_ray=rqueries,
                 render_mlp_gflops=rflops / tr / 1e9, render_fraction_of_matmul=rflops / tr / mm_rate,
                 products_render_rays_per_s=products_rays, render_fraction_of_products_bound=rays_s / products_rays)
        print(f"[{impl.name:8s}] render {H}x{W}: {tr:6.2f} s  {rays_s:9.0f} rays/s  {rqueries:6.1f} queries/ray  "
              f"MLP {rflops / tr / 1e9:6.1f} GFLOP/s = {100 * rflops / tr / mm_rate:5.1f}% of matmul, "
              f"{100 * rays_s / products_rays:5.1f}% of the products' bound ({products_rays:.0f} rays/s)")
    return r


if __name__ == "__main__":
    sys.exit(exit_status(main))
