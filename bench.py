"""Steady-state speed of training steps and full-image renders.

    python bench.py                                  # fern, small networks: ~30-45 s (longer when the CPU is shared)
    python bench.py --baseline                       # and the original's code path, interleaved
    python bench.py --plain                          # and this library's plain (unfused) MLP path
    python bench.py --as_is --steps 3 --render_frames 0          # configs/fern.txt unchanged
    python bench.py --config configs/lego.txt --baseline --render_frames 0
    python bench.py --threads 1 -- --N_rand 2048     # after --: run_nerf flags

Prints steps/s, rays/s, samples/s (network evaluations, coarse + fine), peak
memory and the MLPs' arithmetic rate: their FLOPs counted from the layer sizes
(forward 2 x in x out per sample per layer, backward twice that, whatever the
implementation actually skips; for a rendered frame the coarse network up to
sigma, all that a frame needs of it) over the measured time, as a fraction of a
plain float32 matrix multiply's rate measured in the same run on the same
device. Next to it, the bound set by the step's (and a rendered ray's)
matrix products alone: the same products on random operands of the same
shapes, in the fast path's blocks, with nothing else around them. Timings
are medians over many steps after warm-up; with --baseline the two
implementations alternate in short rounds, with matmul and products probes
in between, so a change in machine load hits all of them alike.

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
from typing import List, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from nerf import fast_mlp  # noqa: E402
import run_nerf  # noqa: E402
from benchmarks import original_path as orig  # noqa: E402
from nerf.datasets import load_scene  # noqa: E402
from nerf.rendering import render  # noqa: E402
from run_nerf_helpers import default_device, keep_freed_memory  # noqa: E402

SMALL = ["--netdepth", "4", "--netwidth", "64", "--netdepth_fine", "4", "--netwidth_fine", "64",
         "--N_rand", "512", "--N_samples", "32", "--N_importance", "32"]


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
    p.add_argument("--plain", action="store_true",
                   help="also time this library with its plain MLP path (run_network fast=False)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args, rest = p.parse_known_args(argv)
    rest = [r for r in rest if r != "--"]
    return args, rest


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


def forward_flops_per_ray(args, kw, train: bool = True) -> float:
    """Forward FLOPs of one ray's network evaluations, 2 x in x out per sample
    per layer; for a rendered frame (not `train`) the coarse network counts
    only up to sigma, all that a frame needs of it."""
    return sum(S * sum(2 * cin * cout for cin, cout, _ in layer_shapes(model, density_only))
               for model, _, S, density_only in network_jobs(args, kw, 1, train))


def samples_per_ray(args) -> int:
    return args.N_samples + ((args.N_samples + args.N_importance) if args.N_importance > 0 else 0)


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
    """One implementation's training state: sampler, networks, optimizer, step."""

    def __init__(self, name, sampler, step_fn, render_fn, device_ctx):
        self.name, self.sampler, self.step_fn, self.render_fn = name, sampler, step_fn, render_fn
        self.device_ctx = device_ctx
        self.step_times, self.render_times = [], []
        self.i = 0
        self.peak = None

    def step(self, device):
        self.i += 1
        sync(device)
        t = time.perf_counter()
        with self.device_ctx():
            batch_rays, target_s = self.sampler(self.i)
            self.step_fn(batch_rays, target_s, self.i)
        sync(device)
        return time.perf_counter() - t


def build(args, scene, device, baseline: bool, plain: bool = False):
    """The library's implementation and, with `baseline`, the original's, with equal initial weights."""
    torch.manual_seed(0)
    np.random.seed(0)
    kw_train, kw_test, _, _, optimizer = run_nerf.create_nerf(args, device)
    bounds = {"near": scene.near, "far": scene.far}
    kw_train.update(bounds)
    kw_test.update(bounds)
    sampler = run_nerf.make_sampler(args, scene, device)

    name = "bf16" if args.mixed_precision else "compiled" if args.compile else "fast"
    impls = [library_impl(name, args, scene, sampler, kw_train, kw_test, optimizer)]
    if plain:
        impls.append(build_plain(args, scene, device, kw_train, kw_test))
    if baseline:
        impls.append(build_original(args, scene, device, kw_train, kw_test))
    return impls, kw_train


def build_plain(args, scene, device, kw_train, kw_test):
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
    return library_impl("plain", args, scene, run_nerf.make_sampler(args, scene, device), kw_tr, kw_te, optimizer)


def library_impl(name, args, scene, sampler, kw_train, kw_test, optimizer) -> "Impl":
    """Training steps and renders through run_nerf's own train_step and render."""

    def step(batch_rays, target_s, i):
        run_nerf.train_step(batch_rays, target_s, scene, kw_train, optimizer, args.chunk)
        for group in optimizer.param_groups:
            group["lr"] = run_nerf.learning_rate(args, i - 1)

    def render_fn(c2w):          # as render_path renders a frame
        with torch.no_grad():
            return render(scene.H, scene.W, scene.K, chunk=args.chunk, c2w=c2w, coarse_maps=False, **kw_test)

    return Impl(name, sampler, step, render_fn, lambda: _null())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_original(args, scene, device, kw_train, kw_test):
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

    def query(inputs, viewdirs, fn):
        return orig.run_network(inputs, viewdirs, fn, embed, embeddirs, args.netchunk)

    swap = {"network_fn": coarse, "network_fine": fine, "network_query_fn": query}
    kw_tr = {**kw_train, **swap}
    kw_te = {**kw_test, **swap}
    with torch.device(device):
        sampler = orig.OriginalSampler(np.asarray(scene.images), scene.poses, scene.i_train, scene.H, scene.W,
                                       scene.K, args.N_rand, args.no_batching,
                                       args.precrop_iters, args.precrop_frac)

    def step(batch_rays, target_s, i):
        orig.train_step(scene.H, scene.W, scene.K, args.chunk, batch_rays, target_s, kw_tr, optimizer)
        for group in optimizer.param_groups:
            group["lr"] = run_nerf.learning_rate(args, i - 1)

    def render_fn(c2w):
        with torch.no_grad(), torch.device(device):
            return orig.render(scene.H, scene.W, scene.K, chunk=args.chunk, c2w=c2w, **kw_te)

    return Impl("baseline", sampler, step, render_fn, lambda: torch.device(device))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    bargs, rest = parse(argv)
    keep_freed_memory()   # as run_nerf.main does
    if bargs.threads:
        torch.set_num_threads(bargs.threads)
    run_argv = ["--config", bargs.config] + ([] if bargs.as_is else SMALL) + rest + ["--no_reload"]
    args = run_nerf.config_parser().parse_args(run_argv)
    args.datadir = resolve_datadir(args.datadir)
    device = default_device()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    scene = load_scene(args)
    impls, kw_train = build(args, scene, device, bargs.baseline, bargs.plain)
    setup_s = time.perf_counter() - t0
    setup_rss = peak_memory_bytes(torch.device("cpu"))
    mm = Matmul(device)
    step_products = Products(network_jobs(args, kw_train, args.N_rand, train=True), device, True, args.netchunk)
    render_rays_probe = min(scene.H * scene.W, 4096)
    render_products = Products(network_jobs(args, kw_train, render_rays_probe, train=False), device, False,
                               args.netchunk)

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"config {bargs.config}{'' if bargs.as_is else ' + small networks'} {' '.join(rest)}: "
          f"{args.netdepth}x{args.netwidth} / {args.netdepth_fine}x{args.netwidth_fine}, N_rand {args.N_rand}, "
          f"N_samples {args.N_samples} + N_importance {args.N_importance}, viewdirs {args.use_viewdirs}, "
          f"{'no_batching' if args.no_batching else 'batching'}, image {scene.H}x{scene.W}  (setup {setup_s:.1f} s)")
    data_bytes, device_bytes = impls[0].sampler.bytes_per_pixel, impls[0].sampler.device_bytes_per_pixel
    print(f"training data: {data_bytes:.2f} bytes per training pixel ({device_bytes:.2f} on the device; "
          f"{len(scene.i_train)} images), peak RSS of loading the scene and building it {setup_rss / 2 ** 20:.0f} MiB")

    # Warm-up, one implementation after the other (peak memory measured here): the
    # fast path last, as its pool stays allocated.
    for impl in reversed(impls):
        peak_memory_start(device)
        for _ in range(bargs.warmup):
            impl.step(device)
        impl.peak = peak_memory_bytes(device)
    for impl in impls[1:]:      # their freed memory was handed back: fault it in again, untimed
        impl.step(device)
    # Timed steps, alternating in rounds with matmul probes between.
    done = 0
    while done < bargs.steps:
        n = min(bargs.round, bargs.steps - done)
        for impl in impls:
            impl.step_times += [impl.step(device) for _ in range(n)]
        mm.probe()
        step_products.probe()
        done += n

    step_flops = 3 * args.N_rand * forward_flops_per_ray(args, kw_train)
    ray_flops = forward_flops_per_ray(args, kw_train, train=False)
    spr = samples_per_ray(args)
    results = {"device": str(device), "threads": torch.get_num_threads(), "load_before": load0,
               "config": bargs.config, "small": not bargs.as_is, "extra_args": rest,
               "train_bytes_per_pixel": data_bytes, "train_device_bytes_per_pixel": device_bytes, "setup_peak_rss_mb": setup_rss / 2 ** 20}

    # Full-image renders (the first test view), alternating.
    if bargs.render_frames > 0:
        pose = torch.as_tensor(scene.poses[scene.i_test[0]][:3, :4], device=device)
        for _ in range(bargs.render_frames):
            for impl in impls:
                sync(device)
                t = time.perf_counter()
                impl.render_fn(pose)
                sync(device)
                impl.render_times.append(time.perf_counter() - t)
            mm.probe()
            for _ in range(3):
                render_products.probe()

    mm_rate = median(mm.rates)
    print(f"plain float32 matmul: {mm_rate / 1e9:.1f} GFLOP/s (median of {len(mm.rates)} probes, "
          f"range {min(mm.rates) / 1e9:.1f}-{max(mm.rates) / 1e9:.1f})")
    print(f"MLP work: {step_flops / 1e9:.2f} GFLOP per training step, {ray_flops / 1e6:.3f} MFLOP per rendered ray "
          f"(coarse network up to sigma)")
    results["matmul_gflops"] = mm_rate / 1e9
    results["step_gflop"] = step_flops / 1e9
    t_products = median(step_products.times)
    results["products_step_s"] = t_products
    print(f"the step's matrix products alone (same shapes and blocks, no other work): {1e3 * t_products:.1f} ms "
          f"= at most {1 / t_products:.2f} steps/s on this device")
    if render_products.times:
        products_rays = render_rays_probe / median(render_products.times)
        results["products_render_rays_per_s"] = products_rays
        print(f"a rendered ray's matrix products alone: at most {products_rays:.0f} rays/s")
    for impl in impls:
        t = median(impl.step_times)
        rate = step_flops / t
        r = {"step_s": t, "steps_per_s": 1 / t, "rays_per_s": args.N_rand / t,
             "samples_per_s": args.N_rand * spr / t, "mlp_gflops": rate / 1e9, "fraction_of_matmul": rate / mm_rate,
             "fraction_of_products_bound": t_products / t,
             "peak_memory_mb": impl.peak / 2 ** 20, "step_times": impl.step_times}
        print(f"[{impl.name:8s}] train: {1 / t:7.2f} steps/s  {args.N_rand / t:9.0f} rays/s  "
              f"{args.N_rand * spr / t:11.0f} samples/s  MLP {rate / 1e9:6.1f} GFLOP/s = "
              f"{100 * rate / mm_rate:5.1f}% of matmul, {100 * t_products / t:5.1f}% of the products' bound  "
              f"(median of {len(impl.step_times)} steps, "
              f"peak {'RSS' if device.type == 'cpu' else 'allocated'} {impl.peak / 2 ** 20:.0f} MiB)")
        if impl.render_times:
            tr = median(impl.render_times)
            rrate = scene.H * scene.W * ray_flops / tr
            rays_s = scene.H * scene.W / tr
            r.update(render_s=tr, render_rays_per_s=rays_s, render_mlp_gflops=rrate / 1e9,
                     render_fraction_of_matmul=rrate / mm_rate,
                     render_fraction_of_products_bound=rays_s / products_rays)
            print(f"[{impl.name:8s}] render {scene.H}x{scene.W}: {tr:6.2f} s  {rays_s:9.0f} rays/s  "
                  f"MLP {rrate / 1e9:6.1f} GFLOP/s = {100 * rrate / mm_rate:5.1f}% of matmul, "
                  f"{100 * rays_s / products_rays:5.1f}% of the products' bound")
        results[impl.name] = r
    for other in impls[1:]:
        f, b = results[impls[0].name], results[other.name]
        line = f"speedup vs {other.name} (same run): training {b['step_s'] / f['step_s']:.2f}x"
        if "render_s" in f:
            line += f", render {b['render_s'] / f['render_s']:.2f}x"
        print(line)
    load1 = os.getloadavg()
    results["load_after"] = load1
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if bargs.json:
        with open(bargs.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
