"""The opt-in occupancy-grid sampler (`--sampler occupancy`, nerf/occupancy.py)
and the default it must leave alone (`--sampler hierarchical`, the original's)."""
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import run_nerf
from test_cli import QUIET, TINY
from test_demo_run import demo_dir  # noqa: F401 (fixture)

# The default path after 3 steps of the demo (seed 4: a network born alive; lrate 5e-3 so that 3 steps
# move the pixels), recorded before the occupancy sampler existed: per parameter tensor its float64 sum
# and L2 norm, and the mean and mean square of the 3 test views' 8-bit pixels.
PINNED = {
    "network_fn.pts_linears.0.weight": (7.236086230375804, 3.225230623232283),
    "network_fn.pts_linears.0.bias": (1.2721320101991296, 0.6894892807169574),
    "network_fn.pts_linears.1.weight": (-0.608229331439361, 3.249175891722873),
    "network_fn.pts_linears.1.bias": (-0.02813588222488761, 0.5823820193339387),
    "network_fn.views_linears.0.weight": (0.6098321999888867, 2.308648206722605),
    "network_fn.views_linears.0.bias": (-0.4151598960161209, 0.3352258914826476),
    "network_fn.feature_linear.weight": (-0.8437949132930953, 3.236002275249797),
    "network_fn.feature_linear.bias": (-0.3543681646697223, 0.6108501717225719),
    "network_fn.alpha_linear.weight": (0.5812587328255177, 0.5038147175789817),
    "network_fn.alpha_linear.bias": (0.007775044068694115, 0.007775044068694115),
    "network_fn.rgb_linear.weight": (1.5012526167556643, 1.0522142072093328),
    "network_fn.rgb_linear.bias": (0.3047192096710205, 0.34166947214398924),
    "network_fine.pts_linears.0.weight": (4.039255924988538, 3.3427138786908697),
    "network_fine.pts_linears.0.bias": (-0.1137780831195414, 0.598363714679404),
    "network_fine.pts_linears.1.weight": (-5.268078163149767, 3.3488363884974905),
    "network_fine.pts_linears.1.bias": (-0.4295850652270019, 0.4915297138404451),
    "network_fine.views_linears.0.weight": (-0.5258008641249035, 2.321707173631914),
    "network_fine.views_linears.0.bias": (-0.7762919077649713, 0.34428823832122935),
    "network_fine.feature_linear.weight": (2.7499862792901695, 3.2970270624007414),
    "network_fine.feature_linear.bias": (0.10634505050256848, 0.5330938668491001),
    "network_fine.alpha_linear.weight": (0.0653097708709538, 0.4984810608280648),
    "network_fine.alpha_linear.bias": (0.1162382960319519, 0.1162382960319519),
    "network_fine.rgb_linear.weight": (0.2194469664245844, 0.9465617450490051),
    "network_fine.rgb_linear.bias": (0.20265833288431168, 0.31498298633123506),
    "pixels": (215.6381172839506, 49110.541666666664),
}
# Measured: reruns on this machine agree to the last bit. Another CPU's kernels may order float32 sums
# differently (~1e-7 relative per operation, amplified by 3 Adam steps to ~1e-5 at most); a change of the
# formulas moves these figures by 1e-3 or more. rel 1e-4 lies between the two.
PIN_RTOL = 1e-4


def pin_run(demo_dir: Path, basedir: Path, *extra: str) -> Path:  # noqa: F811
    argv = ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(basedir), "--expname", "pin",
            "--white_bkgd", "--testskip", "1", "--seed", "4", "--lrate", "5e-3", *TINY, *QUIET,
            "--N_iters", "3", "--i_weights", "3", "--i_testset", "3", *extra]
    assert run_nerf.main(argv) == 0
    return basedir / "pin"


def pin_figures(expdir: Path) -> dict:
    ckpt = torch.load(expdir / "000003.tar", weights_only=True)
    out = {}
    for net in ("network_fn", "network_fine"):
        for k, v in ckpt[f"{net}_state_dict"].items():
            out[f"{net}.{k}"] = (float(v.double().sum()), float(v.double().norm()))
    px = np.stack([imageio.imread(expdir / "testset_000003" / f"{k:03d}.png") for k in range(3)]).astype(np.float64)
    out["pixels"] = (float(px.mean()), float((px ** 2).mean()))
    return out


def checkpoint_weights(expdir: Path) -> dict:
    ckpt = torch.load(expdir / "000003.tar", weights_only=True)
    return {f"{net}.{k}": v for net in ("network_fn", "network_fine") for k, v in ckpt[f"{net}_state_dict"].items()}


def test_the_default_path_is_pinned_and_sampler_hierarchical_is_the_default(demo_dir, tmp_path):  # noqa: F811
    default = pin_run(demo_dir, tmp_path / "default")
    figures = pin_figures(default)
    assert figures.keys() == PINNED.keys()
    for key, (total, norm) in PINNED.items():
        assert figures[key] == pytest.approx((total, norm), rel=PIN_RTOL, abs=1e-6), key
    explicit = pin_run(demo_dir, tmp_path / "explicit", "--sampler", "hierarchical")
    a, b = checkpoint_weights(default), checkpoint_weights(explicit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in range(3):
        name = f"testset_000003/{k:03d}.png"
        assert np.array_equal(imageio.imread(default / name), imageio.imread(explicit / name)), name
