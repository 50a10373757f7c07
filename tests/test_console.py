"""What a run prints when its output is a file, as a new user's first runs
show it (issue 19, item 9): the device first, no progress bars (one line per
finished render), each video named, LPIPS's reason for n/a once, and a finished
run rerun says so and does nothing."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_robustness import SUBPROCESS_ENV, blender_argv, make_blender_scene, snapshot


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return make_blender_scene(tmp_path_factory.mktemp("scene") / "blender")


def run(argv) -> subprocess.CompletedProcess:
    """run_nerf.py with stdout and stderr going to pipes, as to a log file."""
    return subprocess.run([sys.executable, str(REPO / "run_nerf.py"), *argv], capture_output=True, text=True,
                          env=dict(SUBPROCESS_ENV, NERF_NO_DOWNLOAD="1"), timeout=300)


@pytest.fixture(scope="module")
def logged(scene, tmp_path_factory):
    """A 4-step run scoring its test views at steps 2 and 4 and writing videos at step 4."""
    basedir = tmp_path_factory.mktemp("logs")
    argv = blender_argv(scene, basedir, "--N_iters", "4", "--i_weights", "4", "--i_testset", "2", "--i_video", "4",
                        "--i_print", "2")
    proc = run(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return basedir, argv, proc


def test_output_to_a_file_has_no_progress_bars_and_one_line_per_render(logged):
    basedir, _, proc = logged
    out = proc.stdout + proc.stderr
    assert "\r" not in out and "it/s" not in out and "render:" not in out, out
    assert proc.stdout.splitlines()[0] == "device: cpu"
    renders = [line for line in out.splitlines() if line.startswith("rendered ")]
    assert renders == ["rendered 2 frames of 16x16", "rendered 40 frames of 16x16", "rendered 2 frames of 16x16"], out
    video = basedir / "run" / "run_spiral_000004_rgb.mp4"
    assert f"Saved videos {video} and run_spiral_000004_disp.mp4" in proc.stdout.splitlines()
    assert video.stat().st_size > 0 and video.with_name("run_spiral_000004_disp.mp4").stat().st_size > 0


def test_why_lpips_is_not_available_is_said_once_per_run(logged):
    _, _, proc = logged
    tests = [line for line in proc.stdout.splitlines() if line.startswith("[TEST]")]
    assert len(tests) == 2 and all("LPIPS n/a" in line for line in tests)
    assert tests[0].endswith(")") and "LPIPS n/a (" in tests[0]        # the reason, once
    assert tests[1].endswith("LPIPS n/a")


def test_rerunning_a_finished_run_says_so_and_does_nothing(logged):
    basedir, argv, _ = logged
    before = snapshot(basedir)
    proc = run(argv)
    assert proc.returncode == 0, proc.stderr
    assert f"{basedir / 'run'} is already at step 4 of --N_iters 4: nothing was done" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stdout + proc.stderr
    assert snapshot(basedir) == before


def test_the_first_line_is_the_device_also_when_the_demo_scene_is_written(tmp_path, monkeypatch, capsys):
    """The demo's first run writes its scene (saying so) after the device line;
    a later run, with the scene there, starts with the device line as well."""
    import functools

    import run_nerf
    from nerf import demo_scene
    monkeypatch.setattr(demo_scene, "make_demo_scene",      # a small scene: the layout is the same
                        functools.partial(demo_scene.make_demo_scene, H=16, W=16, n_train=3, n_val=1, n_test=1))
    datadir = tmp_path / "data" / "demo"
    argv = ["--dataset_type", "demo", "--datadir", str(datadir), "--basedir", str(tmp_path / "logs"),
            "--expname", "demo", "--white_bkgd", "--netdepth", "1", "--netwidth", "8", "--N_samples", "4",
            "--N_rand", "32", "--i_print", "1000000", "--i_img", "1000000", "--i_testset", "1000000",
            "--i_video", "1000000", "--i_weights", "1000000"]
    capsys.readouterr()
    for n_iters, writes in (("1", True), ("2", False)):
        assert run_nerf.main(argv + ["--N_iters", n_iters]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "device: cpu", lines
        assert (f"Writing the built-in demo scene to {datadir}" in lines) == writes, lines
        if writes:
            assert lines[1] == f"Writing the built-in demo scene to {datadir}"
