"""extract_mesh.py and --render_only's depth maps end to end, on a checkpoint
trained for a few steps on a tiny demo scene: files, formats, the printed
path and the one-line errors."""
import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import extract_mesh
import run_nerf
from conftest import REPO
from nerf.demo_scene import ensure_demo_scene
from test_cli import QUIET, TINY
from test_robustness import SUBPROCESS_ENV

trimesh = pytest.importorskip("trimesh", reason="mesh extraction needs requirements-mesh.txt")

STEPS = 80
pytestmark = pytest.mark.slow   # the module trains a checkpoint first (~15 s)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(arguments naming the run, its folder) after STEPS steps on a 24x24 demo scene:
    enough for opaque rays (test PSNR ~17) with 2-layer, 32-wide networks."""
    root = tmp_path_factory.mktemp("mesh")
    datadir = root / "demo"
    ensure_demo_scene(str(datadir), verbose=False, H=24, W=24, n_train=10, n_val=2, n_test=3)
    args = ["--dataset_type", "demo", "--datadir", str(datadir), "--basedir", str(root / "logs"),
            "--expname", "run", "--white_bkgd", "--testskip", "1", *TINY,
            "--N_samples", "16", "--N_importance", "16", "--N_rand", "512"]
    assert run_nerf.main(args + [*QUIET, "--N_iters", str(STEPS), "--i_weights", str(STEPS), "--lrate", "5e-3"]) == 0
    return args, root / "logs" / "run"


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_mesh_file_is_written_and_named_on_the_last_line(trained, capsys):
    args, expdir = trained
    assert extract_mesh.main(args + ["--mesh_resolution", "24", "--mesh_format", "obj"]) == 0
    path = Path(last_line(capsys))
    assert path == expdir / f"mesh_{STEPS:06d}.obj"
    mesh = trimesh.load(path, process=False)
    assert len(mesh.faces) > 0 and mesh.visual.kind == "vertex"     # coloured vertices
    assert np.all(np.abs(mesh.vertices) < 2.0)     # inside the region every demo camera sees


def test_point_cloud_lies_in_front_of_the_cameras(trained, capsys):
    args, expdir = trained
    assert extract_mesh.main(args + ["--pointcloud", "--pointcloud_stride", "2"]) == 0
    path = Path(last_line(capsys))
    assert path == expdir / f"pointcloud_{STEPS:06d}.ply"
    cloud = trimesh.load(path)
    assert 0 < len(cloud.vertices) <= 10 * 12 * 12
    # Blender-format cameras at radius 4 with near 2 and far 6: each point is 2..6 from some camera.
    assert np.all(np.linalg.norm(cloud.vertices, axis=1) < 4.0 + 1e-3)
    assert cloud.colors.shape == (len(cloud.vertices), 4)


def test_a_network_trained_with_the_occupancy_sampler_gives_its_fine_network_to_every_render(trained, capsys):
    """After the occupancy sampler's warm-up only the fine network learns, so
    the point cloud's hierarchical renders take it for the coarse pass too
    (as --render_only does), and with --sampler occupancy they march its grid;
    either way the points lie where the demo cameras see (radius < 4)."""
    args, expdir = trained
    occupancy_args = [*args, "--expname", "occupancy", "--sampler", "occupancy", "--occupancy_warmup", "20",
                      "--occupancy_resolution", "16"]
    assert run_nerf.main(occupancy_args + [*QUIET, "--N_iters", "60", "--i_weights", "60", "--lrate", "5e-3"]) == 0
    for sampler in ("hierarchical", "occupancy"):
        argv = [*occupancy_args, "--sampler", sampler]
        _, render_kwargs, _, _ = extract_mesh.load_trained(extract_mesh.config_parser().parse_args(argv), "cpu")
        if sampler == "hierarchical":
            assert render_kwargs["network_fn"] is render_kwargs["network_fine"] and "occupancy" not in render_kwargs
        else:               # the grid marches through the fine network alone
            assert render_kwargs["occupancy"].ready
        assert extract_mesh.main(argv + ["--pointcloud"]) == 0
        cloud = trimesh.load(Path(last_line(capsys)))
        assert np.all(np.linalg.norm(cloud.vertices, axis=1) < 4.0 + 1e-3)
    _, render_kwargs, _, _ = extract_mesh.load_trained(extract_mesh.config_parser().parse_args(args), "cpu")
    assert render_kwargs["network_fn"] is not render_kwargs["network_fine"]      # the default's own run: untouched


def test_render_only_writes_depth_maps(trained):
    args, expdir = trained
    assert run_nerf.main(args + ["--render_only", "--render_test"]) == 0
    savedir = expdir / f"renderonly_test_{STEPS:06d}"
    depths = [np.load(savedir / "depth" / f"{k:03d}.npy") for k in range(3)]
    assert not (savedir / "depth" / "003.npy").exists()
    for depth in depths:
        assert depth.dtype == np.float32 and depth.shape == (24, 24)
        finite = depth[np.isfinite(depth)]
        assert finite.size > 0 and np.all((finite >= 2.0 - 1e-4) & (finite <= 6.0 + 1e-4))   # near and far
    assert (savedir / "depth.mp4").stat().st_size > 0
    assert json.loads((savedir / "metrics.json").read_text())["n_views"] == 3


@pytest.mark.parametrize("extra, where", [
    (["--mesh_resolution", "7"], "--mesh_resolution"),
    (["--mesh_bbox", "-1", "-1", "1", "1", "1", "1"], "--mesh_bbox"),
    (["--pointcloud_stride", "0"], "--pointcloud_stride"),
    (["--expname", "never_trained"], "never_trained"),
])
def test_bad_input_is_one_line_and_exit_2(trained, capsys, extra, where):
    args, expdir = trained
    before = sorted(p.name for p in expdir.iterdir())
    assert extract_mesh.main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and where in err[0]
    assert sorted(p.name for p in expdir.iterdir()) == before


@pytest.mark.parametrize("what", [["--mesh_resolution", "16"], ["--pointcloud", "--pointcloud_stride", "3"]])
def test_a_full_disk_is_one_line_and_leaves_no_file(trained, tmp_path, what):
    """A file-size limit below the .ply's size (found by writing it without one):
    one line naming the file, exit 1, no truncated or partial file."""
    args, expdir = trained
    first = subprocess.run([sys.executable, str(REPO / "extract_mesh.py"), *args, *what],
                           capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    path.unlink()
    limit = size // 2

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([sys.executable, str(REPO / "extract_mesh.py"), *args, *what], preexec_fn=set_limit,
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}: {os.strerror(errno.EFBIG)}"
    assert "Traceback" not in proc.stderr
    assert not path.exists() and not [p for p in expdir.iterdir() if ".partial" in p.name]


def test_the_density_lattice_is_built_chunk_by_chunk_in_x_y_z_order(monkeypatch):
    """No index tensor of the whole lattice: every torch.arange is at most
    netchunk long, and the points come in flat order x-major, z fastest."""
    import torch

    real_arange, lengths = torch.arange, []

    def counting_arange(*a, **kw):
        out = real_arange(*a, **kw)
        lengths.append(out.numel())
        return out

    seen = []

    def query(pts, render_kwargs, netchunk, desc=None):
        seen.append(pts.clone())
        return pts[:, 0] * 100 + pts[:, 1] * 10 + pts[:, 2]

    monkeypatch.setattr(torch, "arange", counting_arange)
    monkeypatch.setattr(extract_mesh, "query_density", query)
    axes = [np.arange(5.0), np.arange(3.0), np.arange(7.0)]
    sigma = extract_mesh.density_grid(axes, {}, 16, "cpu")
    assert max(lengths) <= 16 and sum(lengths) == 5 * 3 * 7
    x, y, z = np.meshgrid(*axes, indexing="ij")
    assert np.array_equal(sigma, (x * 100 + y * 10 + z).astype(np.float32))
