"""reproduce.py end to end on a small demo scene: two configs, one of them
interrupted and resumed, the table in Markdown and JSON, finished scenes
skipped, and the dry run's plan."""
import errno
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import reproduce
import run_nerf
from nerf.demo_scene import ensure_demo_scene

STEPS = 6


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "demo"
    ensure_demo_scene(str(path), verbose=False, H=24, W=24, n_train=10, n_val=2, n_test=3)
    return path


def write_config(path: Path, expname: str, demo_dir: Path, basedir: Path) -> Path:
    """A tiny demo config; identical but for the name, so both runs must end with the same weights."""
    path.write_text(f"""expname = {expname}
basedir = {basedir}
datadir = {demo_dir}
dataset_type = demo
white_bkgd = True
testskip = 1
use_viewdirs = True
netdepth = 2
netwidth = 32
netdepth_fine = 2
netwidth_fine = 32
multires = 4
multires_views = 2
N_rand = 128
N_samples = 8
N_importance = 8
N_iters = {STEPS}
i_weights = 3
i_print = 1000000
i_img = 1000000
i_video = 1000000
""")
    return path


def markdown_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 16 and cells[0] != "Run" and not cells[0].startswith("---"):
            rows[cells[0]] = cells
    return rows


def files_under(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_reproduce_trains_resumes_scores_and_skips_finished_scenes(demo_dir, tmp_path, capsys):
    logs, results = tmp_path / "logs", tmp_path / "results"
    straight = write_config(tmp_path / "straight.txt", "straight", demo_dir, logs)
    resumed = write_config(tmp_path / "resumed.txt", "resumed", demo_dir, logs)
    # An interrupted run: half its steps done and saved, its test set never scored.
    assert run_nerf.main(["--config", str(resumed), "--N_iters", str(STEPS // 2)]) == 0
    assert sorted(p.name for p in (logs / "resumed").glob("*.tar")) == ["000003.tar"]
    capsys.readouterr()

    start = time.perf_counter()
    assert reproduce.main(["--configs", str(straight), str(resumed), "--results", str(results)]) == 0
    first_call = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "[1/2] straight" in out and "[2/2] resumed" in out and "step 3 of 6" in out

    # The resumed run went on from step 3 and ended exactly where the straight one did.
    assert sorted(p.name for p in (logs / "resumed").glob("*.tar")) == ["000003.tar", "000006.tar"]
    a = torch.load(logs / "straight" / "000006.tar", weights_only=True)
    b = torch.load(logs / "resumed" / "000006.tar", weights_only=True)
    for key in ("network_fn_state_dict", "network_fine_state_dict"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)

    table = json.loads((results / "paper_table.json").read_text())
    assert table["format"] == reproduce.TABLE_FORMAT and table["not_finished"] == []
    rows = {r["run"]: r for r in table["rows"]}
    assert set(rows) == {"straight", "resumed"}
    for row in rows.values():
        assert row["step"] == STEPS and row["n_views"] == 3 and (row["W"], row["H"]) == (24, 24)
        assert math.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1
        assert row["comparable"] is False and "the paper has no scene 'demo'" in row["why_not"]
        scored = json.loads((logs / row["run"] / f"testset_{STEPS:06d}" / "metrics.json").read_text())
        assert row["psnr"] == scored["mean"]["psnr"] and row["ssim"] == scored["mean"]["ssim"]
    assert rows["straight"]["psnr"] == rows["resumed"]["psnr"]  # same weights, same renders

    # Markdown and JSON agree, to the digits the Markdown shows.
    md = markdown_rows((results / "paper_table.md").read_text())
    assert set(md) == {"straight", "resumed"}
    for run, row in rows.items():
        cells = md[run]
        assert cells[1] == row["scene"] and int(cells[2]) == row["step"] and int(cells[3]) == row["n_views"]
        assert float(cells[6]) == round(row["psnr"], 2) and float(cells[9]) == round(row["ssim"], 3)
        assert cells[12] == ("n/a" if row["lpips"] is None else f"{row['lpips']:.3f}")
        assert cells[15] == "no"

    # Second call: both finished, nothing run, nothing on disk touched but the table.
    before = files_under(logs)
    start = time.perf_counter()
    assert reproduce.main(["--configs", str(straight), str(resumed), "--results", str(results)]) == 0
    assert time.perf_counter() - start < first_call / 2
    out = capsys.readouterr().out
    assert out.count("finished earlier at step 6: skipped") == 2
    assert files_under(logs) == before
    assert json.loads((results / "paper_table.json").read_text())["rows"] == table["rows"]


def test_dry_run_plans_with_measured_step_times_and_writes_nothing(demo_dir, tmp_path, capsys):
    logs = tmp_path / "logs"
    done = write_config(tmp_path / "done.txt", "done", demo_dir, logs)
    half = write_config(tmp_path / "half.txt", "half", demo_dir, logs)
    missing = write_config(tmp_path / "missing.txt", "missing", tmp_path / "no_such_scene", logs)
    missing.write_text(missing.read_text().replace("N_rand = 128", "N_rand = 64"))  # timed on its own
    (logs / "done" / f"testset_{STEPS:06d}").mkdir(parents=True)
    (logs / "done" / f"testset_{STEPS:06d}" / "metrics.json").write_text("{}")
    (logs / "half" / "000004.tar").parent.mkdir(parents=True)
    (logs / "half" / "000004.tar").write_bytes(b"")   # only its name is read
    before = files_under(tmp_path)

    assert reproduce.main(["--configs", str(done), str(half), str(missing), "--dry_run",
                           "--dry_run_steps", "2", "--steps", str(STEPS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert files_under(tmp_path) == before and not (tmp_path / "results").exists()
    timing = [line.split()[1] for line in out if " timing 2 training steps and a test render " in line]
    assert timing == ["half", "missing"]          # said before each measurement (two settings), none for done
    lines = {line.split()[1]: line for line in out if line.startswith("[")}
    assert "finished at step 6: skipped" in lines["done"]
    assert "4 of 6 steps done; 2 steps x " in lines["half"]
    assert "3 test views of 24x24" in lines["half"] and "(timed on demo)" in lines["half"]
    step_s = float(lines["half"].split(" steps x ")[1].split(" s/step")[0])
    assert 0 < step_s < 60
    assert "(render time not estimated: no data)" in lines["missing"]
    assert "timed on the demo scene" in lines["missing"]
    assert out[-1].startswith("Total: ~")


def test_reproduce_rejects_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("expname = x\nN_samples = many\n")
    assert reproduce.main(["--configs", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: line 2: N_samples = many: not an integer\n"
    assert not (tmp_path / "r").exists()


def test_several_gpus_run_one_scene_per_gpu_at_a_time(tmp_path, monkeypatch, capsys):
    """The scheduler alone (no GPU here): each scene sees one GPU in
    CUDA_VISIBLE_DEVICES, one of the two this process was given (2 and 3),
    never two scenes on one GPU at once, both GPUs used."""
    import argparse
    import threading

    spans, lock = [], threading.Lock()

    def timed_scene(scene, run_nerf_args, env=None, output=None):
        start = time.perf_counter()
        output.write(b"training output\n")
        time.sleep(0.05)
        with lock:
            spans.append((env["CUDA_VISIBLE_DEVICES"], start, time.perf_counter(), scene.name))
        return 0, "done"

    monkeypatch.setattr(reproduce, "reproduce_scene", timed_scene)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    scenes = [reproduce.Scene(Path(f"{k}.txt"), argparse.Namespace(expname=f"s{k}", basedir=str(tmp_path)), 10)
              for k in range(5)]
    assert reproduce.run_all(scenes, [], n_gpus=2) == [True] * 5
    assert sorted(name for *_, name in spans) == [f"s{k}" for k in range(5)]
    assert {gpu for gpu, *_ in spans} == {"2", "3"}
    for gpu in ("2", "3"):
        mine = sorted((s, e) for g, s, e, _ in spans if g == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(mine, mine[1:]))
    assert (tmp_path / "s0" / "reproduce.log").read_text() == "training output\n"
    assert capsys.readouterr().out.count(" on GPU ") == 5


@pytest.mark.parametrize("parent, expected", [(None, ["0", "1"]), ("", ["0", "1"]), ("2,3", ["2", "3"]),
                                              ("3, 1", ["3", "1"]), ("GPU-a1,GPU-b2", ["GPU-a1", "GPU-b2"])])
def test_a_child_gets_the_parents_gpu_not_its_index(parent, expected):
    environ = {} if parent is None else {"CUDA_VISIBLE_DEVICES": parent}
    assert [reproduce.visible_device(gpu, environ) for gpu in (0, 1)] == expected


def test_a_scenes_output_goes_to_its_log_and_the_terminal_until_the_terminal_goes(tmp_path, monkeypatch, capsys):
    """stdout and stderr of the child reach both; once writing to the terminal
    fails (a hang-up), the log still gets everything and the child is waited for."""
    child = [sys.executable, "-c", "import sys, time\nprint('step 1', flush=True)\ntime.sleep(0.3)\n"
             "print('step 2', flush=True)\nprint('error: x', file=sys.stderr)\nsys.exit(3)"]
    with open(tmp_path / "reproduce.log", "ab") as log:
        assert reproduce.run_child(child, None, log) == 3
    assert (tmp_path / "reproduce.log").read_text() == "step 1\nstep 2\nerror: x\n"
    assert capsys.readouterr().out == "step 1\nstep 2\nerror: x\n"

    class HungUp(io.TextIOWrapper):
        def write(self, data):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sys, "stdout", HungUp(io.BytesIO()))
    monkeypatch.setattr(HungUp, "buffer", property(lambda self: self))
    with open(tmp_path / "reproduce.log", "ab") as log:
        assert reproduce.run_child(child, None, log) == 3
    assert (tmp_path / "reproduce.log").read_text() == "step 1\nstep 2\nerror: x\n" * 2


def test_the_training_keeps_a_few_checkpoints_unless_told_otherwise(tmp_path):
    import argparse

    scene = reproduce.Scene(Path("a.txt"), argparse.Namespace(expname="a", basedir=str(tmp_path), i_weights=5), 10)
    cmd = reproduce.train_command(scene, ["--chunk", "64"])
    assert cmd[cmd.index("--keep_checkpoints") + 1] == str(reproduce.KEEP_CHECKPOINTS) == "2"
    cmd = reproduce.train_command(scene, ["--keep_checkpoints", "0"])
    assert cmd.count("--keep_checkpoints") == 1 and cmd[cmd.index("--keep_checkpoints") + 1] == "0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dry_run_times_on_the_device_asked_for(demo_dir, tmp_path, capsys):
    """--device reaches the dry run: on a machine without CUDA, --device cuda is
    the one-line error a training run gives, not a plan timed on the CPU."""
    config = write_config(tmp_path / "a.txt", "a", demo_dir, tmp_path / "logs")
    assert reproduce.main(["--configs", str(config), "--dry_run", "--dry_run_steps", "1", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --device: cuda: CUDA is not available") and "Plan:" not in captured.out
    assert reproduce.main(["--configs", str(config), "--dry_run", "--dry_run_steps", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Plan: 1 scenes on cpu")
