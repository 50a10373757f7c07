"""Held-out PSNR against training time for both samplers, trained in
alternating rounds in one process (so that a change in the machine's load
hits both alike; each round resumes the run exactly where the last stopped),
then a test view rendered with both samplers from the same networks
(trained with the default).

    python benchmarks/samplers.py --datadir ../shared/data/nerf_synthetic/lego --steps 3000 --every 500
    python benchmarks/samplers.py ... -- --occupancy_warmup 100      # after --: run_nerf flags for both

Training time is the time spent in the training steps and (occupancy) the
grid's upkeep before them: not the loading, checkpoints or test renders.
Writes `<out>/samplers.json` ({sampler: [[step, train seconds, psnr], ...],
"render": {sampler: seconds per view}, "queries": {sampler: network queries
per ray}, "upkeep": {sampler: share of training time in the grid's upkeep}})
and, with --plot, a PNG of PSNR against time drawn with NumPy.
The lego small configuration: configs/lego.txt with 4x64 networks, 512 rays,
32 + 32 samples, half resolution, testskip 40.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import run_nerf  # noqa: E402
from nerf import occupancy, rendering  # noqa: E402

SMALL = ["--netdepth", "4", "--netdepth_fine", "4", "--netwidth", "64", "--netwidth_fine", "64", "--N_rand", "512",
         "--N_samples", "32", "--N_importance", "32", "--testskip", "40"]


class Timings:
    """Patches run_nerf so that training steps and the occupancy grid's
    upkeep are timed, test renders timed apart, their mean PSNR recorded,
    and the points sent to the networks with gradients counted. Carries on
    over rounds: enter it again for the next round of the same run."""

    def __init__(self):
        self.points = 0
        self.train_seconds = self.upkeep_seconds = self.render_seconds = 0.0
        self.curve = []

    def __enter__(self):
        self._patched = {(run_nerf, "score_test_views"): run_nerf.score_test_views,
                         (run_nerf, "render_frames"): run_nerf.render_frames,
                         (run_nerf, "train_step"): run_nerf.train_step,
                         (occupancy, "before_step"): occupancy.before_step,
                         (rendering.NetworkQuery, "__call__"): rendering.NetworkQuery.__call__}
        timings = self

        def timed(fn, field):
            def call(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                setattr(timings, field, getattr(timings, field) + time.perf_counter() - t)
                return out
            return call

        def score(run, rgbs, step):
            result = self._patched[(run_nerf, "score_test_views")](run, rgbs, step)
            timings.curve.append([step, timings.train_seconds + timings.upkeep_seconds, result["mean"]["psnr"]])
            return result

        query = self._patched[(rendering.NetworkQuery, "__call__")]

        def counted_query(network_query, inputs, viewdirs, network_fn, density_only=False):
            if torch.is_grad_enabled():
                timings.points += inputs.shape[0] * inputs.shape[1]
            return query(network_query, inputs, viewdirs, network_fn, density_only)

        run_nerf.score_test_views = score
        run_nerf.render_frames = timed(run_nerf.render_frames, "render_seconds")
        run_nerf.train_step = timed(run_nerf.train_step, "train_seconds")
        occupancy.before_step = timed(occupancy.before_step, "upkeep_seconds")
        rendering.NetworkQuery.__call__ = counted_query
        return self

    def __exit__(self, *exc):
        for (owner, name), fn in self._patched.items():
            setattr(owner, name, fn)


def two_networks_in_the_grid(grid: occupancy.OccupancyGrid, ray_batch: torch.Tensor, network_fn, network_query_fn,
                             N_samples: int, **kwargs) -> dict:
    """The coarse + fine variant that --two_networks measures against the
    occupancy sampler's one network: the paper's sampling and both losses
    (`rendering.render_rays` unchanged) between each ray's first and last
    candidate segment of the grid instead of near and far (a ray with none
    keeps near and far: dropping it would cost a second host
    synchronisation). Before the grid is built: `render_rays` itself."""
    if grid.ready:
        rays_o, rays_d, near, far = ray_batch[:, 0:3], ray_batch[:, 3:6], ray_batch[:, 6:7], ray_batch[:, 7:8]
        t0, t1, dt = grid.box_span(rays_o, rays_d, near, far)
        candidate = grid.candidate_segments(rays_o, rays_d, t0, t1, dt)            # (N, Mc)
        index = torch.arange(candidate.shape[1], device=candidate.device)
        first = torch.where(candidate, index, candidate.shape[1]).min(-1, keepdim=True).values
        last = torch.where(candidate, index, -1).max(-1, keepdim=True).values
        hit, k = candidate.any(-1, keepdim=True), grid.segment_steps
        start = torch.where(hit, t0 + first * k * dt, near)
        end = torch.where(hit, torch.minimum(t0 + (last + 1) * k * dt, t1), far)
        ray_batch = torch.cat([ray_batch[:, :6], start, end, ray_batch[:, 8:]], -1)
    return rendering.render_rays(ray_batch, network_fn, network_query_fn, N_samples, **kwargs)


class TwoNetworks:
    """While entered, the occupancy sampler renders as `two_networks_in_the_grid`."""

    def __enter__(self):
        self._render_rays = occupancy.OccupancyGrid.render_rays
        occupancy.OccupancyGrid.render_rays = two_networks_in_the_grid
        return self

    def __exit__(self, *exc):
        occupancy.OccupancyGrid.render_rays = self._render_rays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datadir", default="data/nerf_synthetic/lego")
    parser.add_argument("--config", default=str(REPO / "configs" / "lego.txt"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500, help="steps between test-set scores")
    parser.add_argument("--round", type=int, default=500, help="steps a sampler trains before the other's turn")
    parser.add_argument("--two_networks", action="store_true",
                        help="a third run: the occupancy grid with coarse + fine sampling between each ray's first "
                             "and last candidate segment (both networks trained), against its one network")
    parser.add_argument("--out", default="/tmp/nerf_samplers")
    parser.add_argument("--plot", default=None, help="PNG of PSNR against training seconds")
    parser.add_argument("extra", nargs="*", help="run_nerf flags for both runs (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    result = {"steps": args.steps, "extra": args.extra, "render": {}, "queries": {}, "upkeep": {}}
    common = ["--config", args.config, "--datadir", args.datadir, "--basedir", str(out), *SMALL,
              "--i_testset", str(args.every), "--i_weights", str(args.round), "--i_print", "100",
              "--i_img", "1000000", "--i_video", "1000000", "--no_download", *args.extra]
    arms = {"hierarchical": "hierarchical", "occupancy": "occupancy",
            **({"two_networks": "occupancy"} if args.two_networks else {})}     # run name: its --sampler

    def patch(arm):
        return TwoNetworks() if arm == "two_networks" else contextlib.nullcontext()

    timings = {arm: Timings() for arm in arms}
    for end in range(args.round, args.steps + args.round, args.round):
        for arm, sampler in arms.items():
            fresh = ["--no_reload"] if end == args.round else []
            with timings[arm], patch(arm):
                status = run_nerf.main([*common, "--expname", arm, "--sampler", sampler, *fresh,
                                        "--N_iters", str(min(end, args.steps))])
            assert status == 0, arm
    for arm in arms:
        t = timings[arm]
        result[arm] = t.curve
        result["queries"][arm] = t.points / (args.steps * 512)
        result["upkeep"][arm] = t.upkeep_seconds / (t.train_seconds + t.upkeep_seconds)
        print(arm, t.curve, "queries per ray", result["queries"][arm], "upkeep share", result["upkeep"][arm],
              flush=True)
    for arm, sampler in arms.items():     # the same networks: those trained with the default
        with Timings() as t, patch(arm):
            run_nerf.main([*common, "--expname", "hierarchical", "--render_only", "--render_test",
                           "--sampler", sampler])
        result["render"][arm] = t.render_seconds
        print("render", arm, t.render_seconds, flush=True)
    (out / "samplers.json").write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, Path(args.plot))


def plot(result: dict, path: Path, size=(480, 640)) -> None:
    """PSNR (y) against training seconds (x), one polyline per run
    (hierarchical black, occupancy red, two_networks blue), on a white canvas
    with a light grid every 1 dB and every 10 % of the time axis."""
    import imageio.v2 as imageio
    H, W = size
    img = np.full((H, W, 3), 255, np.uint8)
    colours = {"hierarchical": (0, 0, 0), "occupancy": (220, 0, 0), "two_networks": (0, 0, 220)}
    curves = {s: np.array(result[s], dtype=np.float64) for s in colours if result.get(s)}
    t_max = max(c[:, 1].max() for c in curves.values())
    p_lo = np.floor(min(c[:, 2].min() for c in curves.values()))
    p_hi = np.ceil(max(c[:, 2].max() for c in curves.values()))
    margin = 40

    def xy(t, p):
        return (margin + t / t_max * (W - 2 * margin), H - margin - (p - p_lo) / max(p_hi - p_lo, 1) * (H - 2 * margin))

    for k in range(11):
        img[margin:H - margin, int(margin + k / 10 * (W - 2 * margin))] = 220
    for p in np.arange(p_lo, p_hi + 1):
        img[int(xy(0, p)[1]), margin:W - margin] = 220
    for sampler, colour in colours.items():
        if sampler not in curves:
            continue
        pts = np.vstack([[0.0, 0.0, p_lo], curves[sampler]])
        for a, b in zip(pts[:-1], pts[1:]):
            (x0, y0), (x1, y1) = xy(a[1], a[2]), xy(b[1], b[2])
            for s in np.linspace(0, 1, 400):
                x, y = int(x0 + s * (x1 - x0)), int(y0 + s * (y1 - y0))
                img[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = colour
        for _, t, p in curves[sampler]:
            x, y = (int(v) for v in xy(t, p))
            img[max(0, y - 4):y + 5, max(0, x - 4):x + 5] = colour
    imageio.imwrite(path, img)


if __name__ == "__main__":
    main()
