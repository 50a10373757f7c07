"""A run's files under real-world faults: a full disk, an unwritable folder, a
run that ends between saves.

A full disk is simulated with a file-size limit (RLIMIT_FSIZE) on a
subprocess: Python ignores SIGXFSZ, so its writes fail with EFBIG exactly as
they would with ENOSPC, and ffmpeg, which does not, dies mid-video as it would
on a full disk. The limits are chosen from the sizes of a reference run's
files, on the demo config with a one-layer, 8-wide network (a 31 KB
checkpoint) whose untrained renders are noisy enough (multires 10) to make
larger videos (~50 KB at 48x48) and test frames (~4 KB) than the small files
(args.txt, metrics.json, the TensorBoard events without images: under 2 KB).
"""
import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nerf import checkpoints, outputs
from nerf.errors import WriteError
import run_nerf
from conftest import REPO
from nerf.demo_scene import ensure_demo_scene
from test_robustness import assert_same_weights, weights

FAULT = ["--netdepth", "1", "--netwidth", "8", "--N_importance", "0", "--N_samples", "8", "--multires", "10",
         "--no_batching", "--N_rand", "64", "--i_print", "10", "--i_img", "1000000"]
EFBIG = os.strerror(errno.EFBIG)
NO_OUTPUTS = ["--i_video", "1000000", "--i_testset", "1000000"]


@pytest.fixture(scope="module")
def demo48(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "demo48"
    ensure_demo_scene(str(path), verbose=False, H=48, W=48, n_train=10, n_val=2, n_test=3)
    return path


def demo_argv(demo: Path, basedir: Path, *extra: str) -> list:
    return ["--config", str(REPO / "configs" / "demo.txt"), "--datadir", str(demo), "--basedir", str(basedir),
            "--expname", "demo", *FAULT, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo48):
    """A 20-step run without limits that saves, renders and scores at steps 10
    and 20; returns its basedir and {path relative to it: size}."""
    basedir = tmp_path_factory.mktemp("reference")
    assert run_nerf.main(demo_argv(demo48, basedir, "--N_iters", "20", "--i_weights", "10", "--i_video", "10",
                                   "--i_testset", "10")) == 0
    return basedir, {str(p.relative_to(basedir)): p.stat().st_size for p in basedir.rglob("*") if p.is_file()}


def sizes_of(sizes: dict, pattern: str) -> list:
    found = [size for name, size in sizes.items() if Path(name).match(pattern)]
    assert found, pattern
    return found


def between_small_and_large_files(sizes: dict) -> int:
    """A limit that args.txt, config.txt, metrics.json and the events file (no
    images) fit, and no checkpoint, video or test frame."""
    small = max(sizes_of(sizes, "*.txt") + sizes_of(sizes, "metrics.json") + sizes_of(sizes, "events.out.*"))
    big = min(sizes_of(sizes, "*.tar") + sizes_of(sizes, "testset_*/*.png") + sizes_of(sizes, "*.mp4"))
    assert small < big
    return (small + big) // 2


def run_limited(argv: list, limit: int) -> subprocess.CompletedProcess:
    """run_nerf.py in a subprocess whose files may not grow past `limit` bytes."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, str(REPO / "run_nerf.py"), *argv], preexec_fn=set_limit,
                          capture_output=True, text=True, env=env, timeout=300)


def messages(proc: subprocess.CompletedProcess) -> list:
    """The warning and error lines of a run (the progress bar's redraws removed)."""
    lines = [part.strip() for line in proc.stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.startswith(("warning:", "error:"))]


def assert_no_traceback_or_partial_file(proc: subprocess.CompletedProcess, basedir: Path) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert not [p for p in basedir.rglob("*") if ".partial" in p.name]


@pytest.mark.slow
def test_full_disk_before_any_checkpoint_fits(tmp_path, demo48, reference):
    """(a) No checkpoint, video or test frame fits: each failed save is a warning
    and training goes on; the last save fails too, so the run exits 1 saying
    there is no good checkpoint. The scores still reach the console and
    TensorBoard; the small files are complete."""
    basedir = tmp_path / "logs"
    proc = run_limited(demo_argv(demo48, basedir, "--N_iters", "20", "--i_weights", "10", "--i_video", "10",
                                 "--i_testset", "10"), between_small_and_large_files(reference[1]))

    assert proc.returncode == 1, proc.stderr
    expdir = basedir / "demo"
    lines = messages(proc)
    assert (f"warning: {expdir / '000010.tar'}: {EFBIG}; step 10 is not saved, the newest good checkpoint is none; "
            f"the next save, at step 20, tries again") in lines
    assert f"warning: {expdir / 'demo_spiral_000010_rgb.mp4'}: {EFBIG} (ffmpeg could not finish the video); " \
           f"training goes on" in lines
    assert f"warning: {expdir / 'testset_000010' / '000.png'}: {EFBIG}; training goes on" in lines
    assert lines[-1] == (f"error: {expdir / '000020.tar'}: {EFBIG}; step 20 is not saved, "
                         f"the newest good checkpoint is none")
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert_no_traceback_or_partial_file(proc, basedir)
    assert sorted(p.name for p in expdir.iterdir()) == ["args.txt", "config.txt"]   # no .tar, video or testset
    assert (expdir / "args.txt").read_text().count("\n") == len(vars(run_nerf.config_parser().parse_args([])))

    assert "[TEST] step 10 demo48" in proc.stdout and "[TEST] step 20 demo48" in proc.stdout
    events = EventAccumulator(str(basedir / "summaries" / "demo")).Reload()
    assert [e.step for e in events.Scalars("test/psnr")] == [10, 20]


@pytest.mark.slow
def test_full_disk_after_earlier_checkpoints_keeps_them(tmp_path, demo48, reference):
    """(b) The disk fills up between runs: the resumed run's saves at 30 and 40
    fail, each naming 000020.tar as the newest good checkpoint, which stays as
    it was and loads; the run exits 1."""
    ref_basedir, sizes = reference
    basedir = tmp_path / "logs"
    shutil.copytree(ref_basedir, basedir)
    expdir = basedir / "demo"
    before = {name: (expdir / name).read_bytes() for name in ("000010.tar", "000020.tar")}
    limit = between_small_and_large_files(sizes)
    proc = run_limited(demo_argv(demo48, basedir, "--N_iters", "40", "--i_weights", "10", *NO_OUTPUTS), limit)

    assert proc.returncode == 1, proc.stderr
    assert f"reloading from {expdir / '000020.tar'}" in proc.stderr
    assert messages(proc) == [
        f"warning: {expdir / '000030.tar'}: {EFBIG}; step 30 is not saved, the newest good checkpoint is "
        f"{expdir / '000020.tar'}; the next save, at step 40, tries again",
        f"error: {expdir / '000040.tar'}: {EFBIG}; step 40 is not saved, the newest good checkpoint is "
        f"{expdir / '000020.tar'}"]
    assert_no_traceback_or_partial_file(proc, basedir)
    assert sorted(p.name for p in expdir.glob("*.tar")) == ["000010.tar", "000020.tar"]
    assert {name: (expdir / name).read_bytes() for name in before} == before
    assert checkpoints.read_checkpoint(expdir / "000020.tar")["global_step"] == 20


def test_render_only_on_a_full_disk_leaves_no_render_folder(tmp_path, demo48, reference, monkeypatch, capsys):
    """The disk fills up at the third frame: one line, exit 1, and neither a
    renderonly folder with two frames nor a partial one."""
    basedir = tmp_path / "logs"
    shutil.copytree(reference[0], basedir)
    real_write_bytes = Path.write_bytes

    def full_disk_from_frame_2(path, data):
        if path.name.endswith(".png") and not path.name.startswith((".000.", ".001.")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_from_frame_2)
    capsys.readouterr()
    assert run_nerf.main(demo_argv(demo48, basedir, "--render_only")) == 1
    expdir = basedir / "demo"
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"error: {expdir / 'renderonly_path_000020' / '002.png'}: {os.strerror(errno.ENOSPC)}"
    assert not [p for p in expdir.iterdir() if p.name.startswith(("renderonly", ".renderonly"))]


@pytest.mark.slow
def test_checkpoints_fit_but_videos_and_tensorboard_do_not(tmp_path, demo48, reference):
    """(c) Checkpoints and test renders fit, videos and the growing TensorBoard
    file (a held-out image every step) do not: warnings, and the run finishes
    with status 0 and every checkpoint loadable."""
    _, sizes = reference
    ckpt, videos = max(sizes_of(sizes, "*.tar")), min(sizes_of(sizes, "*.mp4"))
    assert ckpt < videos
    basedir = tmp_path / "logs"
    proc = run_limited(demo_argv(demo48, basedir, "--N_iters", "20", "--i_weights", "10", "--i_video", "10",
                                 "--i_testset", "10", "--i_img", "1"), (ckpt + videos) // 2)

    assert proc.returncode == 0, proc.stderr
    expdir = basedir / "demo"
    lines = messages(proc)
    assert sorted(lines) == sorted([f"warning: {basedir / 'summaries' / 'demo'}: {EFBIG}; TensorBoard logging "
                                    f"stops here, training goes on"] + [
        f"warning: {expdir / f'demo_spiral_{step:06d}_rgb.mp4'}: {EFBIG} (ffmpeg could not finish the video); "
        f"training goes on" for step in (10, 20)])
    assert_no_traceback_or_partial_file(proc, basedir)
    assert not list(expdir.glob("*.mp4"))
    for step in (10, 20):
        assert checkpoints.read_checkpoint(expdir / f"{step:06d}.tar")["global_step"] == step
        assert sorted(p.name for p in (expdir / f"testset_{step:06d}").iterdir()) == [
            "000.png", "001.png", "002.png", "metrics.json"]
    events = EventAccumulator(str(basedir / "summaries" / "demo")).Reload()   # what was written still reads
    assert events.Tags()["images"]


def test_a_failed_save_is_retried_at_the_next_and_training_is_undisturbed(tmp_path, demo48, reference,
                                                                         monkeypatch, caplog):
    """The first save hits a full disk after writing part of the file; the run
    goes on, the next save succeeds, and its weights are those of the
    reference run, which saved both times."""
    real_save = torch.save
    calls = []

    def full_disk_once(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            f.write(b"the first part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_once)
    basedir = tmp_path / "logs"
    with caplog.at_level("WARNING", logger="nerf"):
        assert run_nerf.main(demo_argv(demo48, basedir, "--N_iters", "20", "--i_weights", "10", *NO_OUTPUTS)) == 0
    expdir = basedir / "demo"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"warning: {expdir / '000010.tar'}: {os.strerror(errno.ENOSPC)}; step 10 is not saved, the newest good "
        f"checkpoint is none; the next save, at step 20, tries again"]
    assert sorted(p.name for p in expdir.iterdir()) == ["000020.tar", "args.txt", "config.txt"]
    assert_same_weights(weights(expdir / "000020.tar"), weights(reference[0] / "demo" / "000020.tar"))


def test_the_last_step_is_saved_and_resumes_exactly(tmp_path, demo48, caplog):
    """--N_iters 60 --i_weights 50 saves steps 50 and 60; --N_iters 70 then
    continues from 60 to the weights of an uninterrupted 70-step run."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    assert run_nerf.main(demo_argv(demo48, stopped, "--N_iters", "60", "--i_weights", "50", *NO_OUTPUTS)) == 0
    assert sorted(p.name for p in (stopped / "demo").glob("*.tar")) == ["000050.tar", "000060.tar"]
    with caplog.at_level("INFO", logger="nerf"):
        assert run_nerf.main(demo_argv(demo48, stopped, "--N_iters", "70", "--i_weights", "50", *NO_OUTPUTS)) == 0
    assert f"reloading from {stopped / 'demo' / '000060.tar'}" in caplog.text
    assert run_nerf.main(demo_argv(demo48, straight, "--N_iters", "70", "--i_weights", "50", *NO_OUTPUTS)) == 0
    assert sorted(p.name for p in (straight / "demo").glob("*.tar")) == ["000050.tar", "000070.tar"]
    resumed, uninterrupted = weights(stopped / "demo" / "000070.tar"), weights(straight / "demo" / "000070.tar")
    assert_same_weights(resumed, uninterrupted)
    at_60 = weights(stopped / "demo" / "000060.tar")
    assert any(not torch.equal(resumed["fn"][k], at_60["fn"][k]) for k in at_60["fn"])   # it did train on


def test_base_directory_under_a_regular_file_is_refused_before_loading(tmp_path, demo48, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    status = run_nerf.main(demo_argv(demo48, blocker / "logs", "--N_iters", "1"))
    err = capsys.readouterr().err
    assert status == 2
    assert err.splitlines() == [f"error: {blocker / 'logs' / 'demo'}: cannot be made or written (--basedir): "
                                f"{blocker}: {os.strerror(errno.ENOTDIR)}"]
    assert blocker.read_text() == "a file, not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="no /proc on this system")
def test_base_directory_under_proc_is_refused_before_loading(demo48, capsys):
    basedir = Path("/proc") / "nerf-logs"
    status = run_nerf.main(demo_argv(demo48, basedir, "--N_iters", "1"))
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {basedir / 'demo'}: cannot be made or written (--basedir): {basedir}: ")
    assert not basedir.exists()


def test_only_a_runtime_error_caused_by_a_failed_write_is_a_write_error(tmp_path):
    """torch.save into a file whose writes fail raises RuntimeError ("unexpected
    pos"), its context the OSError: that is a WriteError with the OS's reason;
    a RuntimeError of anything else passes unchanged."""
    class FullDisk:
        """A file that takes 700 bytes, then fails as a full disk does."""
        written = 0

        def write(self, data):
            if self.written + len(data) > 700:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return len(data)

        def flush(self):
            pass

    with pytest.raises(RuntimeError) as raw:
        torch.save({"w": torch.zeros(1000)}, FullDisk())
    assert isinstance(raw.value.__context__, OSError)
    with pytest.raises(WriteError) as err:
        with outputs.reported(tmp_path / "x.tar"):
            raise raw.value
    assert (err.value.path, err.value.reason) == (str(tmp_path / "x.tar"), os.strerror(errno.ENOSPC))
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    other.__context__ = KeyError("unrelated")
    with pytest.raises(RuntimeError) as passed:
        with outputs.reported(tmp_path / "x.tar"):
            raise other
    assert passed.value is other


def fsize_limits(sizes: dict) -> list:
    """Limits from below args.txt (the first file a run writes) across the
    checkpoint's size: twelve geometric steps from 1 KB to one byte under the
    checkpoint, and two under args.txt."""
    ckpt = min(sizes_of(sizes, "*.tar"))
    args_txt = sizes["demo/args.txt"]
    sweep = {int(round(1024 * ((ckpt - 1) / 1024) ** (k / 11))) for k in range(12)}
    return sorted(sweep | {args_txt // 2, args_txt - 1})


@pytest.mark.slow
def test_a_full_disk_anywhere_is_one_line_and_loses_no_earlier_file(tmp_path, demo48, reference):
    """The reference run, resumed to step 30 (a save, test renders and videos
    at step 30) under file-size limits swept from below args.txt to one byte
    under the checkpoint: each write fails somewhere else (args.txt,
    inside torch.save, a test frame, a video), and every run ends
    with one error line and status 1, no traceback, no partial file, and every
    earlier file as it was (args.txt and config.txt, rewritten by each run,
    complete)."""
    ref_basedir, sizes = reference
    failed = {}
    for limit in fsize_limits(sizes):
        basedir = tmp_path / str(limit)
        shutil.copytree(ref_basedir, basedir)
        before = {p: p.read_bytes() for p in basedir.rglob("*") if p.is_file() and "summaries" not in p.parts}
        proc = run_limited(demo_argv(demo48, basedir, "--N_iters", "30", "--i_weights", "10", "--i_video", "10",
                                     "--i_testset", "10"), limit)
        assert proc.returncode == 1, (limit, proc.stderr)
        assert_no_traceback_or_partial_file(proc, basedir)
        lines = messages(proc)
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == lines[-1:] and proc.stderr.rstrip().endswith(errors[0]), (limit, proc.stderr)
        failed[limit] = [Path(line.split(": ")[1]).name for line in lines]
        for path, data in before.items():
            if path.name == "args.txt" and path.read_bytes() != data:   # rewritten whole by this run
                assert "N_iters = 30\n" in path.read_text() and path.read_text().count("\n") == data.count(b"\n")
            else:
                assert path.read_bytes() == data, (limit, path)
    names = {name for names in failed.values() for name in names}
    assert {"args.txt", "000030.tar", "000.png", "demo_spiral_000030_rgb.mp4"} <= names, failed
    ckpt_failures = [limit for limit, names in failed.items() if names[-1] == "000030.tar"]
    assert len(ckpt_failures) >= 10, failed


def test_keep_checkpoints_deletes_older_ones_only_after_a_newer_save(tmp_path, demo48, monkeypatch):
    """--keep_checkpoints 2 with a save every 2 steps: after each save only the
    two newest {step}.tar remain; a save that fails (the disk full at step 10)
    deletes nothing, so the newest good checkpoint it names is still there.
    Other files (a renamed checkpoint) are never touched; 0 keeps all."""
    real_save = torch.save

    def full_disk_at_step_10(obj, f, *args, **kwargs):
        if obj["global_step"] == 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_10)
    basedir = tmp_path / "logs"
    (basedir / "demo").mkdir(parents=True)
    (basedir / "demo" / "000001.tar.earlier").write_bytes(b"kept aside by an earlier run")
    assert run_nerf.main(demo_argv(demo48, basedir, "--N_iters", "10", "--i_weights", "2", "--keep_checkpoints", "2",
                                   *NO_OUTPUTS)) == 1
    assert sorted(p.name for p in (basedir / "demo").iterdir()) == [
        "000001.tar.earlier", "000006.tar", "000008.tar", "args.txt", "config.txt"]
    monkeypatch.setattr(torch, "save", real_save)
    assert run_nerf.main(demo_argv(demo48, basedir, "--N_iters", "14", "--i_weights", "2", "--keep_checkpoints", "0",
                                   *NO_OUTPUTS)) == 0
    assert sorted(p.name for p in (basedir / "demo").glob("*.tar")) == [
        "000006.tar", "000008.tar", "000010.tar", "000012.tar", "000014.tar"]
