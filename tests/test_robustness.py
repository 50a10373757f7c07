"""Failures are caught early, explained in one line, and never cost work on disk.

Covers nerf/flags.py, nerf/data_checks.py and nerf/run_folder.py (flags, config files, data folders checked before any
image is loaded or any log is written), the checkpoint guarantees of
nerf/checkpoints.py (atomic writes, fallback from an unreadable newest file,
weights-only loading), and the training loop's handling of Ctrl-C/SIGTERM
and of a non-finite loss. Scenes are tiny synthetic ones built in tmp_path;
networks are 2 x 16.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from nerf import checkpoints, data_checks, flags, rendering, run_folder
import run_nerf
from conftest import REPO, scene_copy_without
from nerf.errors import DataError
from load_blender import pose_spherical
from run_nerf_helpers import NeRF

TINY = ["--netdepth", "2", "--netwidth", "16", "--netdepth_fine", "2", "--netwidth_fine", "16",
        "--N_samples", "4", "--multires", "2", "--multires_views", "1", "--chunk", "4096", "--netchunk", "65536",
        "--i_print", "1000000", "--i_img", "1000000", "--i_testset", "1000000", "--i_video", "1000000"]
# the SIGINT test compares runs in separate processes: same thread count everywhere
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# --- Tiny scenes ------------------------------------------------------------------

def make_blender_scene(root: Path, size: int = 16, counts=(4, 2, 2)) -> Path:
    """4 train, 2 val, 2 test RGBA views of size x size on the Blender render sphere."""
    rng = np.random.default_rng(1)
    for s, (split, n) in enumerate(zip(("train", "val", "test"), counts)):
        (root / split).mkdir(parents=True)
        frames = []
        for k in range(n):
            img = np.full((size, size, 4), 255, np.uint8)
            img[..., :3] = rng.integers(0, 256, (size, size, 3))
            imageio.imwrite(root / split / f"r_{k}.png", img)
            frames.append({"file_path": f"./{split}/r_{k}",
                           "transform_matrix": pose_spherical(360.0 * k / n + 25 * s, -30.0, 4.0).tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    return root


def make_llff_scene(root: Path, n: int = 4, H: int = 12, W: int = 16) -> Path:
    """images_8/ with n H x W PNGs and a matching n x 17 poses_bounds.npy
    (forward-facing cameras, rotation columns down, right, back)."""
    rng = np.random.default_rng(2)
    (root / "images_8").mkdir(parents=True)
    rotation = np.array([[0., 1., 0.], [-1., 0., 0.], [0., 0., 1.]])
    rows = []
    for k in range(n):
        imageio.imwrite(root / "images_8" / f"img_{k:02d}.png", rng.integers(0, 256, (H, W, 3)).astype(np.uint8))
        pose = np.concatenate([rotation, [[0.1 * k], [0.05 * k], [0.]], [[8 * H], [8 * W], [160.]]], 1)
        rows.append(np.concatenate([pose.ravel(), [2.0, 10.0]]))
    np.save(root / "poses_bounds.npy", np.array(rows))
    return root


def blender_argv(datadir: Path, basedir: Path, *extra: str) -> list:
    return ["--dataset_type", "blender", "--datadir", str(datadir), "--basedir", str(basedir), "--expname", "run",
            "--testskip", "1", "--N_rand", "64", *TINY, *extra]


def llff_argv(datadir: Path, basedir: Path, *extra: str) -> list:
    return ["--dataset_type", "llff", "--datadir", str(datadir), "--basedir", str(basedir), "--expname", "run",
            "--factor", "8", "--llffhold", "2", "--N_rand", "64", *TINY, *extra]


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size, modification time and bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def weights(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {"fn": ckpt["network_fn_state_dict"], "fine": ckpt["network_fine_state_dict"],
            "opt": ckpt["optimizer_state_dict"]["state"], "step": ckpt["global_step"]}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("fn", "fine") if a["fine"] is not None or b["fine"] is not None else ("fn",):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} {k} differs"
    for idx in a["opt"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["opt"][idx][k], b["opt"][idx][k]), f"Adam {k} of parameter {idx} differs"


@pytest.fixture(scope="module")
def blender_scene(tmp_path_factory) -> Path:
    return make_blender_scene(tmp_path_factory.mktemp("scene") / "blender")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, blender_scene) -> Path:
    """A finished 4-step coarse + fine run with 000002.tar and 000004.tar (basedir returned)."""
    basedir = tmp_path_factory.mktemp("trained")
    argv = blender_argv(blender_scene, basedir, "--N_iters", "4", "--i_weights", "2", "--N_importance", "4",
                        "--use_viewdirs")
    assert run_nerf.main(argv) == 0
    assert sorted(p.name for p in (basedir / "run").glob("*.tar")) == ["000002.tar", "000004.tar"]
    return basedir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    basedir = tmp_path / "logs"
    shutil.copytree(trained, basedir)
    return basedir


# --- The table of broken inputs -------------------------------------------------

def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _poses(path: Path, edit) -> None:
    arr = np.load(path)
    np.save(path, edit(arr))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _evil_checkpoint(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")   # would create `marker` if ever unpickled
    torch.save({"global_step": 1, "network_fn_state_dict": {}, "payload": Payload()}, path)


# (id, scene, damage(scene_dir, basedir, tmp_path), extra argv, expected `where` (end of), expected words in `what`)
# A damage function may return extra argv (e.g. a config file it wrote).
BROKEN = [
    # LLFF folder
    ("llff-no-datadir", "llff", lambda d, b, t: shutil.rmtree(d), [], "llff", "data folder does not exist"),
    ("llff-no-poses", "llff", lambda d, b, t: (d / "poses_bounds.npy").unlink(), [], "poses_bounds.npy", "missing"),
    ("llff-poses-15-cols", "llff", lambda d, b, t: _poses(d / "poses_bounds.npy", lambda a: a[:, :15]), [],
     "poses_bounds.npy", "has shape (4, 15), expected N x 17"),
    ("llff-poses-not-npy", "llff", lambda d, b, t: _write(d / "poses_bounds.npy", "not numpy"), [],
     "poses_bounds.npy", "not a readable .npy array"),
    ("llff-poses-nan", "llff", lambda d, b, t: _poses(d / "poses_bounds.npy", lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 20, np.nan, a)), [], "poses_bounds.npy", "row 1 holds NaN or inf"),
    ("llff-bound-zero", "llff", lambda d, b, t: _poses(d / "poses_bounds.npy", lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 2 * 17 + 15, 0.0, a)), [], "poses_bounds.npy",
     "row 2 has a depth bound <= 0"),
    ("llff-count-mismatch", "llff", lambda d, b, t: (d / "images_8" / "img_03.png").unlink(), [],
     "poses_bounds.npy", "has 4 poses but"),
    ("llff-no-images", "llff", lambda d, b, t: shutil.rmtree(d / "images_8"), [], "images",
     "missing (needed to make images_8/)"),
    ("llff-unreadable-image", "llff", lambda d, b, t: _write(d / "images_8" / "img_01.png", "garbage"), [],
     "img_01.png", "unreadable image"),
    ("llff-odd-size", "llff", lambda d, b, t: imageio.imwrite(d / "images_8" / "img_02.png",
                                                                 np.zeros((12, 15, 3), np.uint8)), [],
     "img_02.png", "is 15x12, the first image is 16x12"),
    ("llff-llffhold-1", "llff", None, ["--llffhold", "1"], "--llffhold", "holds out all 4 images"),
    # Blender folder
    ("blender-no-val-json", "blender", lambda d, b, t: (d / "transforms_val.json").unlink(), [],
     "transforms_val.json", "missing"),
    ("blender-bad-json", "blender", lambda d, b, t: _write(d / "transforms_train.json", '{"frames": ['), [],
     "transforms_train.json", "not valid JSON"),
    ("blender-no-angle", "blender", lambda d, b, t: _edit_json(d / "transforms_test.json",
                                                                lambda m: m.pop("camera_angle_x")), [],
     "transforms_test.json", "has no 'camera_angle_x'"),
    ("blender-no-file-path", "blender", lambda d, b, t: _edit_json(d / "transforms_train.json",
                                                                    lambda m: m["frames"][1].pop("file_path")), [],
     "transforms_train.json", "frame 1 has no 'file_path'"),
    ("blender-3x4-matrix", "blender", lambda d, b, t: _edit_json(
        d / "transforms_val.json", lambda m: m["frames"][0].update(transform_matrix=m["frames"][0][
            "transform_matrix"][:3])), [], "transforms_val.json", "frame 0 has no 4x4 'transform_matrix'"),
    ("blender-missing-frame", "blender", lambda d, b, t: (d / "test" / "r_1.png").unlink(), [],
     "r_1.png", "missing (referenced by transforms_test.json)"),
    ("blender-truncated-png", "blender", lambda d, b, t: _truncate(d / "train" / "r_2.png"), [],
     "r_2.png", "unreadable image"),
    ("blender-odd-size", "blender", lambda d, b, t: imageio.imwrite(d / "train" / "r_3.png",
                                                                     np.zeros((8, 16, 4), np.uint8)), [],
     "r_3.png", "is 16x8, the first image is 16x16"),
    ("N_rand-over-pixels", "blender", None, ["--no_batching", "--N_rand", "300"], "--N_rand",
     "300 rays per step, but --no_batching draws without replacement from the 16x16 = 256 pixels"),
    ("N_rand-over-crop", "blender", None, ["--no_batching", "--N_rand", "100", "--precrop_iters", "10"],
     "--N_rand", "from the 8x8 = 64 pixels of the centre crop"),
    # flags
    ("unknown-dataset-type", "blender", None, ["--dataset_type", "colmap"], "--dataset_type", "unknown 'colmap'"),
    ("N_rand-zero", "blender", None, ["--N_rand", "0"], "--N_rand", "must be at least 1, got 0"),
    ("N_rand-not-int", "blender", None, ["--N_rand", "abc"], "--N_rand", "invalid int value: 'abc'"),
    ("factor-zero", "llff", None, ["--factor", "0"], "--factor", "must be at least 1, got 0"),
    ("N_samples-zero", "blender", None, ["--N_samples", "0"], "--N_samples", "must be at least 1, got 0"),
    ("chunk-zero", "blender", None, ["--chunk", "0"], "--chunk", "must be at least 1, got 0"),
    ("netchunk-negative", "blender", None, ["--netchunk", "-5"], "--netchunk", "must be at least 1, got -5"),
    ("llffhold-negative", "llff", None, ["--llffhold", "-1"], "--llffhold", "must be 0 or more, got -1"),
    ("precrop_frac-zero", "blender", None, ["--precrop_frac", "0"], "--precrop_frac", "must be in (0, 1], got 0.0"),
    ("precrop_frac-big", "blender", None, ["--precrop_frac", "1.5"], "--precrop_frac", "must be in (0, 1], got 1.5"),
    ("i_weights-zero", "blender", None, ["--i_weights", "0"], "--i_weights", "must be at least 1, got 0"),
    ("lrate-nan", "blender", None, ["--lrate", "nan"], "--lrate", "must be a finite number >= 0, got nan"),
    ("unknown-flag", "blender", None, ["--N_rnd", "5"], "--N_rnd", "unknown flag (did you mean --N_rand?)"),
    ("abbreviated-flag", "blender", None, ["--N_iter", "5"], "--N_iter", "unknown flag (did you mean --N_iters?)"),
    ("render-only-without-checkpoint", "blender", None, ["--render_only", "--expname", "fresh"], "fresh",
     "holds no checkpoint to render"),
    # config files
    ("config-missing", "blender", lambda d, b, t: ["--config", str(t / "nope.txt")], [], "nope.txt",
     "config file does not exist"),
    ("config-unknown-key", "blender", lambda d, b, t: (_write(t / "c.txt", "N_samples = 4\nN_rnd = 64\n"),
                                                        ["--config", str(t / "c.txt")])[1], [],
     "c.txt", "line 2: unknown key 'N_rnd' (did you mean N_rand?)"),
    ("config-bad-int", "blender", lambda d, b, t: (_write(t / "c.txt", "# tiny\nN_samples = many\n"),
                                                    ["--config", str(t / "c.txt")])[1], [],
     "c.txt", "line 2: N_samples = many: not an integer"),
    ("config-bad-bool", "blender", lambda d, b, t: (_write(t / "c.txt", "use_viewdirs = maybe\n"),
                                                     ["--config", str(t / "c.txt")])[1], [],
     "c.txt", "line 1: use_viewdirs = maybe: expected one of true, false"),
    ("config-range", "blender", lambda d, b, t: (_write(t / "c.txt", "\nlrate_decay = 0\n"),
                                                  ["--config", str(t / "c.txt")])[1], [],
     "--lrate_decay", "must be at least 1, got 0 (set in "),
    # checkpoints and earlier outputs
    ("ckpt-shape-mismatch", "blender", None, ["--N_importance", "4", "--use_viewdirs", "--netwidth", "32"],
     "000004.tar", "was trained with --netwidth 16 (its run's "),
    ("ckpt-fine-missing-layers", "blender", None, ["--N_importance", "4", "--use_viewdirs", "--netdepth_fine", "3"],
     "000004.tar", "was trained with --netdepth_fine 2 (its run's "),
    # without the run's args.txt, the layers that differ
    ("ckpt-shape-mismatch-no-args.txt", "blender", lambda d, b, t: (b / "run" / "args.txt").unlink(),
     ["--N_importance", "4", "--use_viewdirs", "--netwidth", "32"],
     "000004.tar", "network_fn_state_dict does not match the network (shapes (file vs network) "
                   "pts_linears.0.weight (16, 15) vs (32, 15)"),
    ("ft_path-missing", "blender", None, ["--ft_path", "/nonexistent/010000.tar"], "010000.tar",
     "no such checkpoint file"),
    ("ft_path-truncated", "blender", lambda d, b, t: (_truncate(b / "run" / "000002.tar"),
                                                       ["--ft_path", str(b / "run" / "000002.tar")])[1], [],
     "000002.tar", "is cut short ("),
    ("ft_path-pickled-object", "blender", lambda d, b, t: (_evil_checkpoint(t / "evil.tar", t / "pwned"),
                                                            ["--ft_path", str(t / "evil.tar")])[1], [],
     "evil.tar", "refused: it pickles a Python object (io.open)"),
    ("no_reload-over-earlier-run", "blender", None, ["--no_reload", "--N_importance", "4", "--use_viewdirs"],
     "run", "holds checkpoints of an earlier run up to 000004.tar; --no_reload starts at step 0"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_input_exits_2_with_one_line(case, tmp_path, blender_scene, trained, capsys):
    name, kind, damage, extra, where, what = case
    datadir = tmp_path / kind
    if kind == "llff":
        make_llff_scene(datadir)
    else:
        shutil.copytree(blender_scene, datadir)
    basedir = copy_run(trained, tmp_path)
    added = (damage(datadir, basedir, tmp_path) if damage else None) or []
    before = snapshot(basedir)
    argv = (llff_argv if kind == "llff" else blender_argv)(datadir, basedir, *extra, *added)
    capsys.readouterr()

    status = run_nerf.main(argv)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "error: "
    assert lines[0].startswith(prefix)
    where_found, what_found = lines[0][len(prefix):].split(": ", 1) if ": " in lines[0] else (lines[0], "")
    assert where_found.endswith(where), lines[0]
    assert what in what_found, lines[0]
    assert snapshot(basedir) == before, "the log folder changed"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["blender-missing-frame", "blender-odd-size", "llff-count-mismatch",
                                  "llff-odd-size", "N_rand-over-pixels"])
def test_data_errors_come_before_any_image_is_decoded_or_log_written(name, tmp_path, blender_scene, monkeypatch,
                                                                   capsys):
    """The same broken inputs, with image decoding made to fail: validation must
    report them from headers alone, and must not create the log folder."""
    _, kind, damage, extra, where, what = next(c for c in BROKEN if c[0] == name)
    datadir = tmp_path / kind
    make_llff_scene(datadir) if kind == "llff" else shutil.copytree(blender_scene, datadir)
    if damage:
        damage(datadir, tmp_path / "logs", tmp_path)
    decoded = []
    import imageio.v3 as iio
    monkeypatch.setattr(iio, "imread", lambda *a, **k: decoded.append(a) or pytest.fail("an image was decoded"))
    argv = (llff_argv if kind == "llff" else blender_argv)(datadir, tmp_path / "logs", *extra)
    assert run_nerf.main(argv) == 2
    assert what in capsys.readouterr().err
    assert decoded == []
    assert not (tmp_path / "logs").exists()


def test_the_table_covers_at_least_15_data_and_flag_mistakes():
    assert len(BROKEN) >= 15
    assert len({c[0] for c in BROKEN}) == len(BROKEN)


def test_pristine_scenes_pass_validation(tmp_path, blender_scene):
    args = run_nerf.config_parser().parse_args(blender_argv(blender_scene, tmp_path))
    assert data_checks.check_data(args) == (16, 16)
    args = run_nerf.config_parser().parse_args(blender_argv(blender_scene, tmp_path, "--half_res"))
    assert data_checks.check_data(args) == (8, 8)
    llff = make_llff_scene(tmp_path / "llff")
    args = run_nerf.config_parser().parse_args(llff_argv(llff, tmp_path))
    assert data_checks.check_data(args) == (12, 16)


def test_real_scenes_pass_and_lego_testskip_1_names_the_missing_frame(fern_dir, lego_dir, tmp_path):
    parser = run_nerf.config_parser()
    fern = parser.parse_args(["--datadir", str(fern_dir), "--factor", "8"])
    assert data_checks.check_data(fern) == (378, 504)
    lego = parser.parse_args(["--dataset_type", "blender", "--datadir", str(lego_dir), "--half_res"])
    assert data_checks.check_data(lego) == (400, 400)
    lego.testskip = 1
    lego.datadir = str(scene_copy_without(lego_dir, tmp_path / "lego", "val/r_1.png"))
    with pytest.raises(DataError) as err:
        data_checks.check_data(lego)
    assert err.value.where == str(tmp_path / "lego" / "val" / "r_1.png")
    assert "referenced by transforms_val.json" in err.value.what


def test_every_shipped_config_passes_the_config_and_flag_checks():
    configs = sorted((REPO / "configs").glob("*.txt"))
    assert configs
    for config in configs:
        args = flags.parse_args(run_nerf.config_parser(), ["--config", str(config)])
        assert args.config == str(config)


def test_cli_subprocess_exit_status_and_single_line(tmp_path, blender_scene):
    """The real entry point: status 2, one stderr line, no traceback; --debug re-raises."""
    (tmp_path / "c.txt").write_text("expname = x\nnetwdith = 16\n")
    argv = [sys.executable, str(REPO / "run_nerf.py"), "--config", str(tmp_path / "c.txt"),
            "--datadir", str(blender_scene), "--basedir", str(tmp_path / "logs")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'c.txt'}: line 2: unknown key 'netwdith' (did you mean netwidth?)"
    assert not (tmp_path / "logs").exists()
    with pytest.raises(DataError, match="unknown key 'netwdith'"):   # --debug: the exception itself, traceback and all
        run_nerf.main(argv[2:] + ["--debug"])


# --- Checkpoints ------------------------------------------------------------------

def test_truncated_newest_checkpoint_is_skipped_kept_and_training_resumes(tmp_path, blender_scene, trained,
                                                                         caplog):
    basedir = copy_run(trained, tmp_path)
    run = basedir / "run"
    good4 = weights(run / "000004.tar")
    _truncate(run / "000004.tar")
    damaged = (run / "000004.tar").read_bytes()

    argv = blender_argv(blender_scene, basedir, "--N_iters", "4", "--i_weights", "2", "--N_importance", "4",
                        "--use_viewdirs")
    with caplog.at_level("INFO", logger="nerf"):
        assert run_nerf.main(argv) == 0

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if "skipped" in w] == [
        f"warning: {run / '000004.tar'}: is cut short ({len(damaged)} bytes, its zip archive has no end): the save or "
        "copy did not finish; skipped and kept as it is (move it away, or name a good checkpoint with --ft_path); "
        "trying the one before, 000002.tar"]
    assert any(f"reloading from {run / '000002.tar'}" in r.getMessage() for r in caplog.records)
    # the damaged file is kept byte for byte under another name, never deleted or overwritten
    assert (run / "000004.tar.corrupt").read_bytes() == damaged
    # resumed from step 2 exactly: the rewritten step 4 equals the lost one
    assert_same_weights(weights(run / "000004.tar"), good4)


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    net = NeRF(D=2, W=16, input_ch=3, output_ch=4)
    opt = torch.optim.Adam(net.parameters())
    path = tmp_path / "000002.tar"
    checkpoints.save_checkpoint(path, 2, net, None, opt, {}, [checkpoints.rng_state()])
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, 3, net, None, opt, {}, [checkpoints.rng_state()])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000002.tar"]   # no partial file left behind


def _rezipped(data: bytes, keep) -> bytes:
    """The zip archive `data` (torch.save's format) again, with only the entries `keep(name)` accepts."""
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = [(name, archive.read(name)) for name in archive.namelist() if keep(name)]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, content in entries:
            archive.writestr(name, content)
    return out.getvalue()


def _saved(ckpt: dict) -> bytes:
    import io
    out = io.BytesIO()
    torch.save(ckpt, out)
    return out.getvalue()


# (id, the damaged file's bytes from the good file's bytes and its content, the reason's words)
DAMAGED_CHECKPOINTS = [
    *[(f"truncated-to-{n}", lambda data, ckpt, n=n: data[:n], "is cut short (") for n in (1, 3, 10, 100, 1000)],
    *[(f"truncated-by-{n}", lambda data, ckpt, n=n: data[:-n], "is cut short (") for n in (1, 100, 5000)],
    ("truncated-to-half", lambda data, ckpt: data[:len(data) // 2], "is cut short ("),
    ("zero-bytes", lambda data, ckpt: b"", "is empty (0 bytes): not a checkpoint"),
    *[(f"random-bytes-{seed}", lambda data, ckpt, seed=seed: b"\x17" + np.random.default_rng(seed).bytes(5000),
       "is not a PyTorch checkpoint (5001 bytes that begin with neither a zip nor a pickle header)")
      for seed in range(3)],
    ("text", lambda data, ckpt: b"step = 4\n", "is not a PyTorch checkpoint (9 bytes"),
    ("random-pickle-stream", lambda data, ckpt: b"\x80\x02" + np.random.default_rng(7).bytes(300),
     "is a damaged or cut short checkpoint (302 bytes in the legacy pickle format"),
    ("zip-without-data.pkl", lambda data, ckpt: _rezipped(data, lambda n: not n.endswith("/data.pkl")),
     "is a damaged checkpoint archive (it lacks data.pkl)"),
    ("zip-without-a-tensor", lambda data, ckpt: _rezipped(data, lambda n: not n.endswith("/data/0")),
     "is a damaged checkpoint archive (it lacks data/0)"),
    ("no-global_step", lambda data, ckpt: _saved({k: v for k, v in ckpt.items() if k != "global_step"}),
     "is not a NeRF checkpoint (no network_fn_state_dict / global_step)"),
    ("no-optimizer", lambda data, ckpt: _saved({k: v for k, v in ckpt.items() if k != "optimizer_state_dict"}),
     "is not a usable NeRF checkpoint: it has no 'optimizer_state_dict'"),
    ("not-a-dict", lambda data, ckpt: _saved([1, 2, 3]), "is not a NeRF checkpoint"),
    *[(f"global_step-{value!r}", lambda data, ckpt, value=value: _saved({**ckpt, "global_step": value}),
       f"is not a usable NeRF checkpoint: 'global_step' is {value!r}, not a step number")
      for value in ("4", 4.0, True, -5, None)],
    *[(f"network_fn_state_dict-{kind}",
       lambda data, ckpt, value=value: _saved({**ckpt, "network_fn_state_dict": value}),
       "is not a usable NeRF checkpoint: 'network_fn_state_dict' is not a dict of named tensors")
      for kind, value in (("int", 5), ("list", [1, 2]), ("strings", {"pts_linears.0.weight": "w"}), ("none", None))],
    ("network_fine_state_dict-list", lambda data, ckpt: _saved({**ckpt, "network_fine_state_dict": [torch.ones(1)]}),
     "is not a usable NeRF checkpoint: 'network_fine_state_dict' is not a dict of named tensors"),
    ("optimizer_state_dict-list", lambda data, ckpt: _saved({**ckpt, "optimizer_state_dict": []}),
     "is not a usable NeRF checkpoint: 'optimizer_state_dict' is not a dict"),
]


@pytest.mark.parametrize("case", DAMAGED_CHECKPOINTS, ids=[c[0] for c in DAMAGED_CHECKPOINTS])
def test_each_damaged_checkpoint_is_one_whole_sentence(case, tmp_path, trained):
    """Reading a damaged file: DataError naming it, whose reason is one line
    that says what is wrong in whole words (not torch's text cut off, not an
    internal error such as "pop from empty list")."""
    _, damage, reason = case
    good = trained / "run" / "000004.tar"
    path = tmp_path / "000004.tar"
    path.write_bytes(damage(good.read_bytes(), torch.load(good, weights_only=True)))
    with pytest.raises(DataError) as err:
        checkpoints.read_checkpoint(path)
    assert err.value.where == str(path)
    assert err.value.what.startswith(reason), err.value.what
    assert "\n" not in err.value.what and len(err.value.what) < 200, err.value.what
    if reason == "is cut short (":
        assert err.value.what == (f"is cut short ({path.stat().st_size} bytes, its zip archive has no end): "
                                  "the save or copy did not finish")


@pytest.mark.parametrize("case", [c for c in DAMAGED_CHECKPOINTS if c[0] in
                                  ("truncated-to-half", "zero-bytes", "global_step-'4'")], ids=lambda c: c[0])
def test_a_damaged_only_checkpoint_is_one_warning_line(case, tmp_path, blender_scene, trained, caplog, capsys):
    """The run folder's only checkpoint is damaged: training warns once, in one
    line naming the file, why, and what to do, then starts from step 0 and
    keeps the file; --render_only adds only its error."""
    _, damage, reason = case
    basedir = copy_run(trained, tmp_path)
    run = basedir / "run"
    (run / "000002.tar").unlink()
    damaged = damage((run / "000004.tar").read_bytes(), torch.load(run / "000004.tar", weights_only=True))
    (run / "000004.tar").write_bytes(damaged)
    argv = blender_argv(blender_scene, basedir, "--N_importance", "4", "--use_viewdirs")
    with caplog.at_level("INFO", logger="nerf"):
        assert run_nerf.main(argv + ["--render_only"]) == 2
        assert run_nerf.main(argv + ["--N_iters", "1", "--i_weights", "1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "000004.tar" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0] == warnings[1], warnings        # once per run
    assert warnings[0].startswith(f"warning: {run / '000004.tar'}: {reason}"), warnings[0]
    assert warnings[0].endswith("; skipped and kept as it is (move it away, or name a good checkpoint with "
                                "--ft_path); no earlier checkpoint to fall back on"), warnings[0]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {run}: holds no checkpoint to render (--render_only renders a trained network: "
                      "train first, or name one with --ft_path)"]
    assert (run / "000004.tar").read_bytes() == damaged
    assert checkpoints.read_checkpoint(run / "000001.tar")["global_step"] == 1


def test_pickled_object_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "evil.tar", marker)
    with pytest.raises(DataError) as err:
        checkpoints.read_checkpoint(tmp_path / "evil.tar")
    assert err.value.where == str(tmp_path / "evil.tar")
    assert err.value.what.startswith("refused: it pickles a Python object")
    assert not marker.exists()
    # and in a run folder it is skipped like a corrupt one, never loaded
    (tmp_path / "run").mkdir()
    _evil_checkpoint(tmp_path / "run" / "000009.tar", marker)
    assert checkpoints.find_checkpoint(tmp_path / "run", None, False) == (None, None)
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for path in [*REPO.glob("*.py"), *REPO.glob("nerf/*.py")]:
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls, "expected at least the checkpoint reader"
    assert all("weights_only=True" in args for _, args in calls), calls


def test_keep_earlier_renames_instead_of_overwriting(tmp_path):
    (tmp_path / "testset_000010").mkdir()
    (tmp_path / "testset_000010" / "000.png").write_bytes(b"old")
    assert run_folder.keep_earlier(tmp_path / "testset_000010") == tmp_path / "testset_000010"
    assert not (tmp_path / "testset_000010").exists()
    assert (tmp_path / "testset_000010.earlier" / "000.png").read_bytes() == b"old"
    (tmp_path / "testset_000010").mkdir()
    run_folder.keep_earlier(tmp_path / "testset_000010")
    assert (tmp_path / "testset_000010.earlier2").is_dir()
    (tmp_path / "000004.tar").write_bytes(b"not a checkpoint")
    run_folder.keep_earlier(tmp_path / "000004.tar")
    assert (tmp_path / "000004.tar.corrupt").read_bytes() == b"not a checkpoint"
    assert run_folder.keep_earlier(tmp_path / "absent.mp4") == tmp_path / "absent.mp4"


# --- Rendering a run without the network flags it was trained with ----------------------

RUN_NETWORK = {"netdepth": "1", "netwidth": "24", "netdepth_fine": "1", "netwidth_fine": "12", "N_importance": "4",
               "use_viewdirs": "True", "multires": "3", "multires_views": "1"}


def network_argv(dropped=()) -> list:
    return [arg for flag, value in RUN_NETWORK.items() if flag not in dropped
            for arg in ([f"--{flag}"] if flag == "use_viewdirs" else [f"--{flag}", value])]


@pytest.fixture(scope="module")
def demo_with_network_flags(tmp_path_factory):
    """The demo (16x16) trained 2 steps with command-line network flags: (common argv, run folder)."""
    from nerf.demo_scene import ensure_demo_scene
    root = tmp_path_factory.mktemp("network_flags")
    ensure_demo_scene(str(root / "demo"), verbose=False, H=16, W=16, n_train=4, n_val=1, n_test=1)
    common = ["--dataset_type", "demo", "--datadir", str(root / "demo"), "--basedir", str(root / "logs"),
              "--expname", "demo", "--white_bkgd", "--N_samples", "4", "--N_rand", "64", "--testskip", "1",
              "--i_print", "1000000", "--i_img", "1000000", "--i_testset", "1000000", "--i_video", "1000000"]
    assert run_nerf.main(common + network_argv() + ["--N_iters", "2", "--i_weights", "2"]) == 0
    return common, root / "logs" / "demo"


@pytest.mark.parametrize("dropped", [[flag] for flag in RUN_NETWORK] + [list(RUN_NETWORK)],
                         ids=[flag for flag in RUN_NETWORK] + ["all"])
def test_rendering_without_the_runs_network_flags_names_them_and_its_args_txt(dropped, demo_with_network_flags,
                                                                             capsys):
    common, run = demo_with_network_flags
    defaults = run_nerf.config_parser().parse_args([])
    before = snapshot(run)
    capsys.readouterr()
    assert run_nerf.main(common + network_argv(dropped) + ["--render_only"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    named = [flag for flag in checkpoints.NETWORK_FLAGS if flag in dropped]
    theirs = " ".join(f"--{flag} {RUN_NETWORK[flag]}" for flag in named)
    ours = " ".join(f"--{flag} {getattr(defaults, flag)}" for flag in named)
    assert err == [f"error: {run / '000002.tar'}: was trained with {theirs} (its run's {run / 'args.txt'}), not "
                   f"{ours}: add those flags, or take all the run's flags with --config {run / 'args.txt'}"]
    assert snapshot(run) == before


def test_rendering_with_the_runs_args_txt_as_config_takes_its_network_flags(demo_with_network_flags, tmp_path):
    _, run = demo_with_network_flags
    shutil.copytree(run, tmp_path / "demo")
    assert run_nerf.main(["--config", str(tmp_path / "demo" / "args.txt"), "--basedir", str(tmp_path),
                          "--render_only", "--render_test"]) == 0
    frame = imageio.imread(tmp_path / "demo" / "renderonly_test_000002" / "000.png")
    assert frame.shape == (16, 16, 3)


def test_render_only_twice_keeps_the_first_render_aside(tmp_path, blender_scene, trained, caplog):
    """Re-rendering (here at another --render_factor) is allowed: the earlier
    render moves to `<folder>.earlier`, untouched, as training outputs do."""
    basedir = copy_run(trained, tmp_path)
    argv = blender_argv(blender_scene, basedir, "--N_importance", "4", "--use_viewdirs", "--render_only")
    assert run_nerf.main(argv + ["--render_factor", "4"]) == 0
    first = snapshot(basedir / "run" / "renderonly_path_000004")
    assert "000.png" in first and "video.mp4" in first
    with caplog.at_level("WARNING", logger="nerf"):
        assert run_nerf.main(argv + ["--render_factor", "2"]) == 0
    assert snapshot(basedir / "run" / "renderonly_path_000004.earlier") == first
    again = basedir / "run" / "renderonly_path_000004"
    assert imageio.imread(again / "000.png").shape == (8, 8, 3)    # 16 / 2, where the first was 16 / 4
    assert sorted(p.name for p in again.iterdir()) == sorted(k for k in first if "/" not in k)
    assert any("already existed; kept it as renderonly_path_000004.earlier" in r.getMessage() for r in caplog.records)


# --- Signals and non-finite losses ------------------------------------------------------

def _count_training_calls(monkeypatch, action, after: int):
    """Wraps the network query (fast path or not) to call `action(output, n)`
    from its `after`-th call within a training step (one call per training
    step without a fine network; the collapse guard's probe before the first
    step is not counted)."""
    original, original_step = rendering.run_network, run_nerf.train_step
    calls = {"n": 0, "in_step": False}

    def run_network(*args, **kwargs):
        out = original(*args, **kwargs)
        if calls["in_step"]:
            calls["n"] += 1
            if calls["n"] >= after:
                return action(out, calls["n"])
        return out

    def train_step(*args, **kwargs):
        calls["in_step"] = True
        try:
            return original_step(*args, **kwargs)
        finally:
            calls["in_step"] = False

    monkeypatch.setattr(rendering, "run_network", run_network)
    monkeypatch.setattr(run_nerf, "train_step", train_step)
    return calls


def test_nan_loss_stops_naming_the_step_and_writes_nothing_newer(tmp_path, blender_scene, monkeypatch, capsys):
    _count_training_calls(monkeypatch, lambda out, n: out * float("nan"), after=5)
    basedir = tmp_path / "logs"
    argv = blender_argv(blender_scene, basedir, "--N_iters", "12", "--i_weights", "2", "--i_print", "3")
    status = run_nerf.main(argv)
    err = capsys.readouterr().err
    assert status == 1
    assert "error: step 5: loss is not finite" in err
    assert f"the newest checkpoint is {basedir / 'run' / '000004.tar'}" in err
    assert sorted(p.name for p in (basedir / "run").iterdir() if "tar" in p.name) == ["000002.tar", "000004.tar"]
    assert all(torch.isfinite(v).all() for v in weights(basedir / "run" / "000004.tar")["fn"].values())


def test_sigterm_saves_the_current_step_and_exits_143(tmp_path, blender_scene, monkeypatch, capsys):
    def terminate(out, n):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    _count_training_calls(monkeypatch, terminate, after=3)
    basedir = tmp_path / "logs"
    status = run_nerf.main(blender_argv(blender_scene, basedir, "--N_iters", "50", "--i_weights", "1000"))
    out = capsys.readouterr().out
    assert status == 128 + signal.SIGTERM == 143
    assert f"Interrupted: saved step 3 to {basedir / 'run' / '000003.tar'}" in out
    assert [p.name for p in (basedir / "run").glob("*.tar")] == ["000003.tar"]
    assert checkpoints.read_checkpoint(basedir / "run" / "000003.tar")["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored after the run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_render_only_stops_it_without_a_word_about_checkpoints(signum, tmp_path, blender_scene,
                                                                               trained):
    """Ctrl-C or SIGTERM mid-render: one line saying the render stopped and
    that --render_only saves nothing by design (not "no checkpoint was
    saved"), 128 + the signal, no traceback, no partial folder, the run's
    checkpoints untouched."""
    basedir = copy_run(trained, tmp_path)
    run = basedir / "run"
    before = snapshot(run)
    # 2048 samples a ray in chunks of 512 rays: the 40 frames take far longer than the signal takes to come
    argv = blender_argv(blender_scene, basedir, "--N_importance", "4", "--use_viewdirs", "--render_only",
                        "--N_samples", "2048", "--chunk", "512")
    proc = subprocess.Popen([sys.executable, str(REPO / "run_nerf.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    partial = run / ".renderonly_path_000004.partial"
    deadline = time.time() + 120
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert partial.exists(), "the render never started"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "checkpoint was saved" not in out + err
    assert err.splitlines()[-1] == ("Interrupted: the render stopped and its unfinished frames were removed "
                                    "(--render_only writes no checkpoint, so nothing else is lost)")
    assert not partial.exists() and not (run / "renderonly_path_000004").exists()
    assert {k: v for k, v in snapshot(run).items() if k.endswith(".tar")} == \
           {k: v for k, v in before.items() if k.endswith(".tar")}


@pytest.mark.parametrize("render_only", [True, False])
def test_ctrl_c_while_loading_does_not_speak_of_a_lost_checkpoint(render_only, tmp_path, blender_scene, trained,
                                                                 monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_nerf, "load_scene", interrupted)
    basedir = copy_run(trained, tmp_path)
    argv = blender_argv(blender_scene, basedir, "--N_importance", "4", "--use_viewdirs", "--N_iters", "8")
    assert run_nerf.main(argv + (["--render_only"] if render_only else [])) == 130
    assert capsys.readouterr().err.splitlines() == [
        "error: interrupted before training or rendering started, or after it ended: there was nothing to save"]


@pytest.mark.slow
def test_sigint_mid_run_saves_current_step_and_resume_matches_uninterrupted(tmp_path, blender_scene):
    def cmd(basedir, *extra):
        return [sys.executable, str(REPO / "run_nerf.py"),
                *blender_argv(blender_scene, basedir, "--N_importance", "4", "--use_viewdirs", "--N_rand", "256",
                              "--raw_noise_std", "1", *extra)]

    interrupted = tmp_path / "interrupted"
    stderr_file = open(tmp_path / "stderr.txt", "w+")   # a file: the progress bar must never fill a pipe
    proc = subprocess.Popen(cmd(interrupted, "--N_iters", "100000", "--i_weights", "1000000", "--i_print", "1"),
                            stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=SUBPROCESS_ENV)
    deadline = time.time() + 90
    for line in proc.stdout:   # wait until training is under way
        if line.startswith("[TRAIN] Iter: 3 ") or time.time() > deadline:
            break
    out_before = line
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    stderr_file.seek(0)
    err = stderr_file.read()
    stderr_file.close()
    assert proc.returncode == 130, err
    saved = re.search(r"Interrupted: saved step (\d+) to (\S+)", out)
    assert out_before.startswith("[TRAIN] Iter: 3 "), "training never got under way"
    assert saved, out
    step = int(saved.group(1))
    assert step >= 3 and Path(saved.group(2)) == interrupted / "run" / f"{step:06d}.tar"
    assert checkpoints.read_checkpoint(Path(saved.group(2)))["global_step"] == step
    assert "Traceback" not in err

    final = str(step + 3)
    resumed = subprocess.Popen(cmd(interrupted, "--N_iters", final, "--i_weights", final),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    straight = subprocess.run(cmd(tmp_path / "straight", "--N_iters", final, "--i_weights", final),
                              capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    _, resumed_err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and straight.returncode == 0, resumed_err + straight.stderr
    assert f"reloading from {interrupted / 'run' / f'{step:06d}.tar'}" in resumed_err
    name = f"{step + 3:06d}.tar"
    assert_same_weights(weights(interrupted / "run" / name), weights(tmp_path / "straight" / "run" / name))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_hang_up_saves_the_current_step_and_exits_129(tmp_path, blender_scene):
    """A dropped SSH connection (SIGHUP) mid-training: as SIGTERM, the step is
    saved, printed, and the exit status is 128 + 1; no traceback."""
    basedir = tmp_path / "logs"
    stderr_file = open(tmp_path / "stderr.txt", "w+")   # a file: the progress bar must never fill a pipe
    proc = subprocess.Popen([sys.executable, str(REPO / "run_nerf.py"),
                             *blender_argv(blender_scene, basedir, "--N_iters", "100000", "--i_weights", "1000000",
                                           "--i_print", "1")],
                            stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=SUBPROCESS_ENV)
    deadline = time.time() + 90
    for line in proc.stdout:   # wait until training is under way
        if line.startswith("[TRAIN] Iter: 2 ") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=60)
    stderr_file.seek(0)
    err = stderr_file.read()
    stderr_file.close()
    assert line.startswith("[TRAIN] Iter: 2 "), "training never got under way"
    assert proc.returncode == 128 + signal.SIGHUP == 129, err
    saved = re.search(r"Interrupted: saved step (\d+) to (\S+)", out)
    assert saved, out
    step = int(saved.group(1))
    assert step >= 2 and [p.name for p in (basedir / "run").glob("*.tar")] == [f"{step:06d}.tar"]
    assert checkpoints.read_checkpoint(basedir / "run" / f"{step:06d}.tar")["global_step"] == step
    assert "Traceback" not in err


def test_an_input_error_on_another_rank_is_printed_with_its_rank(tmp_path, blender_scene, monkeypatch, capsys):
    """Under torchrun, rank 1 finds its node-local data missing before the ranks
    meet: one line, prefixed with the rank. A flag error, which every rank sees
    alike, stays rank 0's to print."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "stdout", sys.stdout)   # main() silences a non-main rank's stdout
    missing = tmp_path / "not_on_this_node"
    assert run_nerf.main(blender_argv(missing, tmp_path / "logs", "--N_iters", "1")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"rank 1: error: {missing}"), err
    assert run_nerf.main(blender_argv(blender_scene, tmp_path / "logs", "--N_rand", "0")) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("keep", [1, 2])
def test_keep_checkpoints_never_deletes_the_step_just_saved_for_a_skipped_later_file(tmp_path, keep):
    """Resuming skips an unreadable newer checkpoint (say 000009.tar) and trains on
    from an older one: pruning after the save of step 5 keeps step 5 (and the
    newest before it), never trading it for the unreadable later file."""
    for step in (1, 3, 4, 5, 9):
        (tmp_path / f"{step:06d}.tar").write_bytes(b"x")
    run_folder.prune_checkpoints(tmp_path, keep, saved_step=5)
    kept = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert kept == [f"{s:06d}.tar" for s in (4, 5)][-keep:] + ["000009.tar"]
