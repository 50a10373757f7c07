"""Held-out PSNR against training wall time for both samplers, one after the
other in one process (ratios from the same run), then a test view rendered
with both samplers from the same (hierarchically trained) networks.

    python benchmarks/samplers.py --datadir ../shared/data/nerf_synthetic/lego --steps 600 --every 200
    python benchmarks/samplers.py ... -- --occupancy_warmup 100      # after --: run_nerf flags for both

Training time excludes the test renders (timed apart). Writes
`<out>/samplers.json` ({sampler: [[step, train seconds, psnr], ...],
"render": {sampler: seconds per view}, "queries": {sampler: network queries
per ray}}) and, with --plot, a PNG of PSNR against time drawn with NumPy.
The lego small configuration: configs/lego.txt with 4x64 networks, 512 rays,
32 + 32 samples, half resolution, testskip 40.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import run_nerf  # noqa: E402
from nerf import rendering  # noqa: E402

SMALL = ["--netdepth", "4", "--netdepth_fine", "4", "--netwidth", "64", "--netwidth_fine", "64", "--N_rand", "512",
         "--N_samples", "32", "--N_importance", "32", "--testskip", "40"]


class Timings:
    """Patches run_nerf so that test renders are timed apart from training,
    their mean PSNR recorded, and the points sent to the networks counted."""

    def __init__(self):
        self.points = self.rays = 0
        self.render_seconds = 0.0
        self.curve = []
        self.start = None

    def __enter__(self):
        self._score, self._render, self._query = run_nerf.score_test_views, run_nerf.render_frames, \
            rendering.NetworkQuery.__call__
        timings = self

        def render_frames(run, poses, *args, **kwargs):
            t = time.perf_counter()
            out = timings._render(run, poses, *args, **kwargs)
            timings.render_seconds += time.perf_counter() - t
            return out

        def score(run, rgbs, step):
            result = timings._score(run, rgbs, step)
            timings.curve.append([step, time.perf_counter() - timings.start - timings.render_seconds,
                                  result["mean"]["psnr"]])
            return result

        def query(self, inputs, viewdirs, network_fn, density_only=False):
            if torch.is_grad_enabled():
                timings.points += inputs.shape[0] * inputs.shape[1]
            return timings._query(self, inputs, viewdirs, network_fn, density_only)

        run_nerf.score_test_views, run_nerf.render_frames = score, render_frames
        rendering.NetworkQuery.__call__ = query
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        run_nerf.score_test_views, run_nerf.render_frames = self._score, self._render
        rendering.NetworkQuery.__call__ = self._query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datadir", default="data/nerf_synthetic/lego")
    parser.add_argument("--config", default=str(REPO / "configs" / "lego.txt"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500, help="steps between test-set scores")
    parser.add_argument("--out", default="/tmp/nerf_samplers")
    parser.add_argument("--plot", default=None, help="PNG of PSNR against training seconds")
    parser.add_argument("extra", nargs="*", help="run_nerf flags for both runs (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    result = {"steps": args.steps, "extra": args.extra, "render": {}, "queries": {}}
    common = ["--config", args.config, "--datadir", args.datadir, "--basedir", str(out), *SMALL,
              "--N_iters", str(args.steps), "--i_testset", str(args.every), "--i_weights", str(args.steps),
              "--i_print", "100", "--i_img", "1000000", "--i_video", "1000000", "--no_download", *args.extra]
    for sampler in ("hierarchical", "occupancy"):
        with Timings() as timings:
            status = run_nerf.main([*common, "--expname", sampler, "--no_reload", "--sampler", sampler])
        assert status == 0, sampler
        result[sampler] = timings.curve
        result["queries"][sampler] = timings.points / (args.steps * 512)
        print(sampler, timings.curve, "queries per ray", result["queries"][sampler], flush=True)
    for sampler in ("hierarchical", "occupancy"):     # the same networks: those trained with the default
        with Timings() as timings:
            run_nerf.main([*common, "--expname", "hierarchical", "--render_only", "--render_test",
                           "--sampler", sampler])
        result["render"][sampler] = timings.render_seconds
        print("render", sampler, timings.render_seconds, flush=True)
    (out / "samplers.json").write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, Path(args.plot))


def plot(result: dict, path: Path, size=(480, 640)) -> None:
    """PSNR (y) against training seconds (x), one polyline per sampler
    (hierarchical black, occupancy red), on a white canvas with a light grid
    every 1 dB and every 10 % of the time axis."""
    import imageio.v2 as imageio
    H, W = size
    img = np.full((H, W, 3), 255, np.uint8)
    curves = {s: np.array(result[s], dtype=np.float64) for s in ("hierarchical", "occupancy") if result.get(s)}
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
    for sampler, colour in (("hierarchical", (0, 0, 0)), ("occupancy", (220, 0, 0))):
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
