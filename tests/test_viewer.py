"""The web viewer in a real browser (headless Chromium driven by Playwright):
view.py serving a trained demo shows its coloured solids; a camera moved through
viser's API changes the picture, which then sharpens. Also the viewer's camera
conversions and its errors. Skipped, with the reason, without
requirements-viewer.txt or the system's chromium (CI installs both)."""
import importlib.util
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from nerf import camera_path
import test_camera_path
from test_camera_path import demo_args

trained_demo = test_camera_path.trained_demo     # the fixture, shared
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]

needs_viser = pytest.mark.skipif(importlib.util.find_spec("viser") is None,
                                 reason="viser is not installed (pip install -r requirements-viewer.txt)")
needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or CHROMIUM is None,
    reason="needs playwright (requirements-viewer.txt) and the system's chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def solid_fractions(png: bytes) -> dict:
    """Fractions of the screenshot's pixels in the demo's red and green (its sphere and box)."""
    img = iio.imread(png)[..., :3].astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return {"red": float(np.mean((r > 150) & (g < 110) & (b < 110))),
            "green": float(np.mean((g > 110) & (r < 110) & (b < 110)))}


def sharpness(png: bytes, box) -> float:
    """Mean absolute difference between neighbouring pixels inside box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    img = iio.imread(png)[y0:y1, x0:x1, :3].astype(float)
    return float(np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean())


def wait_for(condition, timeout: float, what: str, period: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium.new_page(viewport={"width": 640, "height": 480})
        chromium.close()


def start_view_py(demo_dir, basedir, port: int):
    """A view.py process serving the trained demo on `port`, and its output lines up to and including the
    "Viewing ..." line (or up to its end, if it stopped before)."""
    server = subprocess.Popen([sys.executable, str(ROOT / "view.py"), *demo_args(demo_dir, basedir),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines = [server.stdout.readline()]
    while lines[-1] and not lines[-1].startswith("Viewing"):
        lines.append(server.stdout.readline())
    return server, lines


@pytest.mark.slow
@needs_viser
@needs_browser
def test_view_py_shows_the_demo_solids_in_chromium(trained_demo, browser, tmp_path):
    demo_dir, basedir = trained_demo
    port = free_port()
    server, lines = start_view_py(demo_dir, basedir, port)
    try:
        assert f"127.0.0.1:{port}" in lines[-1] and "000300.tar" in lines[-1], lines
        browser.goto(f"http://127.0.0.1:{port}")
        blank = solid_fractions(browser.screenshot())
        assert blank["red"] < 0.002 and blank["green"] < 0.002     # the page before any picture
        shown = wait_for(lambda: (lambda f: f if f["red"] > 0.01 and f["green"] > 0.01 else None)(
            solid_fractions(browser.screenshot())), 30, "the red sphere and the green box")
        assert shown["red"] > 10 * blank["red"] and shown["green"] > 10 * blank["green"]
        (tmp_path / "view.png").write_bytes(browser.screenshot())
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.slow      # a view.py process: torch, the scene, the networks' warm-up
@needs_viser
def test_view_py_prints_its_device_first_and_no_viser_banner(trained_demo):
    """view.py's first line names the device, as run_nerf.py's does; viser's
    banner (printed whatever its `verbose` says) and its "Server stopped" line
    never reach the output, up to the exit after Ctrl-C."""
    demo_dir, basedir = trained_demo
    port = free_port()
    server, lines = start_view_py(demo_dir, basedir, port)
    try:
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    assert lines[0] == "device: cpu\n" and lines[-1].startswith("Viewing"), lines
    output = "".join(lines) + rest
    for banner in ("viser", "Websocket", "ws://", "Server stopped"):
        assert banner not in output, output
    assert server.returncode == 0, output


@pytest.fixture()
def live_viewer(trained_demo, monkeypatch):
    """A Viewer of the trained demo serving from a thread of this process, with
    tiny previews and a long rest so that the preview stays on screen a while."""
    import run_nerf
    from nerf import flags, viewer
    from nerf.datasets import load_scene

    monkeypatch.setattr(viewer, "PREVIEW_SECONDS", 0.001)
    monkeypatch.setattr(viewer, "REST_SECONDS", 2.0)
    demo_dir, basedir = trained_demo
    args = flags.parse_args(run_nerf.config_parser(), demo_args(demo_dir, basedir))
    scene = load_scene(args)
    _, render_kwargs, _, _, _ = run_nerf.create_nerf(args)
    render_kwargs.update(near=scene.near, far=scene.far)
    port = free_port()
    live = viewer.Viewer(scene, render_kwargs, flags.choose_device(None), basedir / "demo", port=port)
    thread = threading.Thread(target=live.serve_forever, daemon=True)
    thread.start()
    yield live, port
    live.stop()
    thread.join(10)


@pytest.mark.slow
@needs_viser
@needs_browser
def test_moving_the_camera_changes_the_picture_then_sharpens(live_viewer, browser):
    live, port = live_viewer
    browser.goto(f"http://127.0.0.1:{port}")
    wait_for(lambda: any(shown.full for shown in live.shown.values()), 30, "the first full-resolution picture")
    # No Share button (viser draws it as this icon; it is there without the viewer's theme), and the
    # browser's own panel is shown.
    assert browser.locator(".tabler-icon-share").count() == 0
    assert browser.get_by_text("Max resolution").count() > 0 and browser.get_by_text("Add keyframe").count() > 0
    box = (0, 140, 300, 480)   # left of the panel, below the notice of software WebGL
    before = browser.screenshot()
    (client,) = live.server.get_clients().values()
    version = live.cameras[client.client_id].version
    camera = client.camera
    target = camera.look_at
    offset = camera.position - target
    turn = math.radians(40)      # orbit 40 degrees about the up direction (world z for the demo)
    rotation = np.array([[math.cos(turn), -math.sin(turn), 0], [math.sin(turn), math.cos(turn), 0], [0, 0, 1]])
    camera.position = target + rotation @ offset
    preview = wait_for(lambda: client.client_id in live.shown and live.shown[client.client_id].version > version
                       and not live.shown[client.client_id].full and browser.screenshot(), 10, "the preview")
    time.sleep(0.3)
    preview = browser.screenshot()
    assert np.abs(iio.imread(preview).astype(int) - iio.imread(before).astype(int)).mean() > 2   # it changed
    assert not live.shown[client.client_id].full        # still the preview
    wait_for(lambda: live.shown[client.client_id].full, 20, "the full-resolution picture")
    time.sleep(0.5)
    sharp = browser.screenshot()
    assert sharpness(sharp, box) > 1.3 * sharpness(preview, box)
    assert solid_fractions(sharp)["red"] + solid_fractions(sharp)["green"] > 0.005

    # What a click on a training camera does: the browser's camera, as it reports it back, is that camera.
    i = int(live.scene.i_train[3])
    live._go_to(client, live.scene.poses[i])
    wait_for(lambda: np.allclose(live.cameras[client.client_id].pose[:3, :4], live.scene.poses[i], atol=1e-3),
             10, "the browser to report the training camera's pose")


@pytest.mark.slow
@needs_viser
def test_view_py_errors_are_one_line_and_exit_2(trained_demo, tmp_path):
    demo_dir, basedir = trained_demo
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {"--port": demo_args(demo_dir, basedir) + ["--port", str(port)],
                 str(tmp_path / "empty" / "demo"): demo_args(demo_dir, tmp_path / "empty") + ["--port",
                                                                                            str(free_port())]}
        for where, argv in cases.items():
            done = subprocess.run([sys.executable, str(ROOT / "view.py"), *argv], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {where}: "), done.stderr


@needs_viser
@pytest.mark.parametrize("seed", range(4))
def test_browser_camera_round_trip(seed):
    from nerf import viewer
    rng = np.random.default_rng(seed)
    q = rng.normal(size=4)
    q = q / np.linalg.norm(q) * np.sign(q[0])
    R = viewer.matrix_from_wxyz(q)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(viewer.wxyz_from_matrix(R), q, atol=1e-12)
    pose = viewer.browser_pose(q, rng.normal(size=3))
    wxyz, position = viewer.viser_camera(pose)
    np.testing.assert_allclose(wxyz, q, atol=1e-12)
    np.testing.assert_allclose(position, pose[:3, 3])
    # The browser camera looks along its OpenCV +z, which is the NeRF pose's -z.
    np.testing.assert_allclose(R[:, 2], -pose[:3, 2], atol=1e-12)


def test_quaternion_by_hand():
    from nerf import viewer
    half = math.sqrt(0.5)
    # 90 degrees about x: (cos 45, sin 45, 0, 0); about z by 180 degrees: (0, 0, 0, 1).
    np.testing.assert_allclose(viewer.matrix_from_wxyz([half, half, 0, 0]), [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
                               atol=1e-12)
    np.testing.assert_allclose(viewer.wxyz_from_matrix(np.diag([-1.0, -1, 1])), [0, 0, 0, 1], atol=1e-12)


def test_look_at_point_of_cameras_facing_a_point():
    from nerf import viewer
    rng = np.random.default_rng(0)
    target = np.array([0.3, -0.2, 0.5])
    poses = []
    for _ in range(12):
        centre = target + 4 * rng.normal(size=3) / 1.7
        back = (centre - target) / np.linalg.norm(centre - target)     # OpenGL: the camera looks along -z
        right = np.cross([0, 0, 1], back)
        right /= np.linalg.norm(right)
        poses.append(np.stack([right, np.cross(back, right), back, centre], 1))
    np.testing.assert_allclose(viewer.look_at_point(np.stack(poses)), target, atol=1e-9)


def test_picture_size_keeps_the_aspect():
    from nerf import viewer
    for h, w, pixels in [(480, 640, 1000), (600, 800, 10 ** 9), (100, 300, 1), (720, 1280, 50000)]:
        ph, pw = viewer.picture_size(h, w, pixels)
        assert 1 <= ph <= h and 1 <= pw <= w
        assert ph * pw <= max(pixels, 1) * 1.1 + pw + ph
        assert pw / ph == pytest.approx(w / h, rel=0.1 if ph > 10 else 1.0)


@needs_viser
def test_keyframes_saved_as_a_camera_path(live_viewer):
    live, _ = live_viewer
    a, b = np.eye(4), np.eye(4)
    a[:3, 3], b[:3, 3] = [0, -4, 1], [4, 0, 1]
    first = live.save_camera_path([(a, 30.0), (b, 50.0)], seconds=2, fps=5)
    assert first == live.expdir / "camera_path.json"
    path = camera_path.load_camera_path(first)
    assert len(path.poses) == 10 and path.fps == 5 and (path.H, path.W) == (live.scene.H, live.scene.W)
    np.testing.assert_allclose(path.poses[0], a)
    np.testing.assert_allclose(path.poses[-1], b)
    np.testing.assert_allclose(path.fovs[[0, -1]], [30, 50])      # the demo is not NDC: the keyframes' fov
    live.save_camera_path([(b, 40.0)], seconds=1, fps=3)
    assert len(camera_path.load_camera_path(first).poses) == 3
    assert len(camera_path.load_camera_path(live.expdir / "camera_path.json.earlier").poses) == 10


def watch_training(monkeypatch, record) -> None:
    """Every training viewer gets a browser that never takes its pictures (so
    it keeps rendering: a picture every step or two, however fast the steps
    run), and calls record(live, picture) before each picture it renders."""
    from nerf import viewer
    real_training_viewer = viewer.training_viewer

    def watched(*args, **kwargs):
        live = real_training_viewer(*args, **kwargs)
        if live is not None:
            live.cameras[-1] = viewer.BrowserCamera(viewer.browser_pose([1, 0, 0, 0], live.home), live.fov,
                                                    24, 32, 1, 0.0)
            live.clients[-1] = viewer.BrowserState(max_resolution=256, training_share=0.25)
            real_render = live._render_whole
            live._render_whole = lambda picture: record(live, picture) or real_render(picture)
        return live

    monkeypatch.setattr(viewer, "training_viewer", watched)


@needs_viser
def test_training_with_a_watching_viewer_trains_exactly_as_without(trained_demo, tmp_path, monkeypatch):
    """The viewer renders between training steps (deterministic renders: no
    random numbers drawn), so the weights come out bit for bit the same."""
    import torch
    import run_nerf

    demo_dir, _ = trained_demo
    rendered = []
    watch_training(monkeypatch, lambda live, picture: rendered.append(picture))
    for name, extra in (("plain", []), ("watched", ["--viewer", "--viewer_port", str(free_port())])):
        assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", name, "--N_iters", "20",
                                       "--i_weights", "20", *extra)) == 0
    assert len(rendered) > 3
    plain, watched_ckpt = (torch.load(tmp_path / name / "000020.tar", weights_only=True)
                           for name in ("plain", "watched"))
    for key in ("network_fn_state_dict", "network_fine_state_dict"):
        for param, value in plain[key].items():
            assert torch.equal(value, watched_ckpt[key][param]), param


@needs_viser
def test_training_viewer_port_in_use_is_one_line(trained_demo, tmp_path, capsys):
    import run_nerf
    demo_dir, _ = trained_demo
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_nerf.main(demo_args(demo_dir, tmp_path, "--N_iters", "2", "--viewer",
                                       "--viewer_port", str(port))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --viewer_port: ")
    assert not (tmp_path / "demo").exists()          # stopped before any work


@pytest.mark.parametrize("ndc", [False, True])
def test_browser_rays_render_as_training_does(trained_demo, ndc):
    """From a training camera at its own size the viewer's picture is render()'s;
    on a wider canvas at the same vertical field of view the middle columns are
    the same pixels (forward-facing scenes keep the training camera's NDC)."""
    import torch
    import run_nerf
    from nerf import viewer
    from nerf.datasets import load_scene

    demo_dir, basedir = trained_demo
    args = run_nerf.config_parser().parse_args(demo_args(demo_dir, basedir))
    scene = load_scene(args)
    _, kwargs, _, _, _ = run_nerf.create_nerf(args, torch.device("cpu"))
    kwargs.update(near=0.0, far=1.0, ndc=True) if ndc else kwargs.update(near=scene.near, far=scene.far)
    pose = scene.poses[scene.i_test[1]]
    fov = 2 * math.atan(0.5 * scene.H / scene.focal)
    with torch.no_grad():
        expected, _, _, _ = run_nerf.render(scene.H, scene.W, scene.K, chunk=4096, c2w=torch.as_tensor(pose), **kwargs)
    rgb, _, _ = viewer.render_world_rays(scene, kwargs, *viewer.browser_rays(pose, fov, scene.H, scene.W, "cpu"))
    torch.testing.assert_close(rgb.reshape(expected.shape), expected, atol=1e-5, rtol=0)
    for margin in (4, 10):
        rgb, _, _ = viewer.render_world_rays(scene, kwargs, *viewer.browser_rays(pose, fov, scene.H,
                                                                                 scene.W + 2 * margin, "cpu"))
        middle = rgb.reshape(scene.H, scene.W + 2 * margin, 3)[:, margin:margin + scene.W]
        torch.testing.assert_close(middle, expected, atol=1e-5, rtol=0)


@needs_viser
def test_outputs_rgb_depth_and_accumulation(live_viewer):
    import torch
    from nerf import viewer

    live, _ = live_viewer
    rng = np.random.default_rng(0)
    h, w = 6, 5
    rgb, acc = rng.uniform(size=(h * w, 3)), rng.uniform(size=h * w)
    disp = rng.uniform(0.1, 1.0, size=h * w)
    job = viewer.RenderJob(0, 1, True, h, w, torch.zeros(h * w, 3), torch.zeros(h * w, 3))
    for name, value in (("rgb", rgb), ("disp", disp), ("acc", acc)):   # two slices each
        job.maps[name] = [torch.as_tensor(value[:7]), torch.as_tensor(value[7:])]
    live.clients[0] = viewer.BrowserState(max_resolution=256)
    live.clients[0].output = "RGB"
    np.testing.assert_array_equal(live.picture(job), np.round(rgb.reshape(h, w, 3) * 255))
    live.clients[0].output = "accumulation"
    np.testing.assert_array_equal(live.picture(job), np.round(np.repeat(acc.reshape(h, w, 1), 3, -1) * 255))
    live.clients[0].output = "depth"
    depth = live.picture(job).astype(int)
    empty = (acc < 0.5).reshape(h, w)
    assert (depth[empty] == 0).all() and (depth[~empty].sum(-1) > 0).all()     # nothing hit: black
    near, far = np.argmax(np.where(acc >= 0.5, disp, -1)), np.argmin(np.where(acc >= 0.5, disp, 9))
    # Near is yellow (red + green above blue), far dark blue (blue above red + green).
    near_colour, far_colour = depth.reshape(-1, 3)[near], depth.reshape(-1, 3)[far]
    assert near_colour[0] + near_colour[1] > 2 * near_colour[2] and far_colour[2] > far_colour[0]


class FakeClock:
    """Stands in for the viewer's `time`: seconds pass only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SimulatedBrowser:
    """One browser as the viewer sees it (client id 5, its canvas `height` x
    `width`, resting at the mean training camera, its panel's settings the
    defaults and its progress line `live.clients[5].progress`), with a renderer of a known
    speed on a fake clock: each slice of n rays takes n / rays_per_second, sees
    the networks' current `weights` version, and returns black. `pictures`:
    (time, h, w, the weights versions its slices saw) of each picture sent."""

    def __init__(self, live, monkeypatch, rays_per_second: float, height: int = 500, width: int = 800):
        import torch
        from nerf import viewer

        self.clock, self.weights, self.pictures, self.slices = FakeClock(), 0, [], []
        self.render_seconds = 0.0
        monkeypatch.setattr(viewer, "time", self.clock)

        def render_rays(rays_o, rays_d):
            seconds = len(rays_o) / rays_per_second
            self.clock.now += seconds
            self.render_seconds += seconds
            self.slices.append(self.weights)
            n = len(rays_o)
            return torch.zeros(n, 3), torch.zeros(n), torch.zeros(n)

        def send(image, **_):
            self.pictures.append((self.clock.now, image.shape[0], image.shape[1], set(self.slices)))
            self.slices = []

        client = types.SimpleNamespace(scene=types.SimpleNamespace(set_background_image=send))
        monkeypatch.setattr(live, "_render_rays", render_rays)
        monkeypatch.setattr(live.server, "get_clients", lambda: {5: client})
        live.stopped.set()          # no rendering thread: the test calls the viewer itself
        time.sleep(0.2)
        live.shown.clear()
        live.job = None
        live.rays_per_second = rays_per_second       # as measured at that speed
        live.cameras = {5: viewer.BrowserCamera(viewer.browser_pose([1, 0, 0, 0], live.home), live.fov, height,
                                                width, 1, self.clock.now)}
        live.clients = {5: viewer.BrowserState(max_resolution=live.default_resolution,
                                               progress=types.SimpleNamespace(content=""))}

    def move(self, live) -> None:
        camera = live.cameras[5]
        camera.version, camera.changed_at = camera.version + 1, self.clock.now


@pytest.fixture()
def training_viewer(trained_demo):
    """A Viewer of the demo's fresh networks with the training panel, not serving from a thread."""
    import run_nerf
    from nerf import flags, viewer
    from nerf.datasets import load_scene

    demo_dir, basedir = trained_demo
    args = flags.parse_args(run_nerf.config_parser(), demo_args(demo_dir, basedir))
    scene = load_scene(args)
    _, render_kwargs, _, _, _ = run_nerf.create_nerf(args)
    render_kwargs.update(near=scene.near, far=scene.far)
    live = viewer.Viewer(scene, render_kwargs, flags.choose_device(None), basedir / "demo", port=free_port(),
                         training=True)
    yield live
    live.stop()


@needs_viser
@pytest.mark.parametrize("share, step_seconds, rays_per_second", [     # rays/s: a loaded CPU's one thread .. a GPU
    (0.9, 0.01, 2e3), (0.9, 0.3, 2e4), (0.9, 0.05, 1e6), (0.5, 0.3, 2e3), (0.5, 0.01, 2e4), (0.5, 0.3, 1e6)])
def test_training_keeps_redrawing_whole_pictures_within_the_share(training_viewer, monkeypatch, caplog,
                                                                  rays_per_second, step_seconds, share):
    """Training steps (each changes the weights) with a browser at rest: every
    picture is rendered against one set of weights, a new picture arrives at
    least every REFRESH_SECONDS, the pictures grow (by at most REFINE times the
    pixels) up to the canvas or what the share pays for within a refresh
    period, and rendering takes no more than the share leaves it."""
    from nerf import viewer

    live = training_viewer
    browser = SimulatedBrowser(live, monkeypatch, rays_per_second)
    live.clients[5].training_share = share
    caplog.clear()
    start = browser.clock.now
    for step in range(int(12.0 / step_seconds)):       # 12 s of training
        browser.clock.now += step_seconds
        browser.weights += 1
        live.training_step(step, {"loss": 0.01, "psnr": 20.0})
    assert not viewer_warnings(caplog)          # no picture failed
    elapsed = browser.clock.now - start
    times = [start] + [at for at, _, _, _ in browser.pictures]
    assert len(times) > 4
    for at, h, w, weights in browser.pictures:
        assert len(weights) == 1, f"the {h}x{w} picture at {at - start:.2f} s saw weights {sorted(weights)}"
    assert max(np.diff(times)) <= viewer.REFRESH_SECONDS
    pixels = [h * w for _, h, w, _ in browser.pictures]
    assert all(b <= viewer.REFINE * a * 1.1 for a, b in zip(pixels, pixels[1:]))     # 1.1: rounding of h, w
    affordable = viewer.PICTURE_SHARE * viewer.REFRESH_SECONDS * (1 - share) * rays_per_second
    canvas = 160 * 256                  # 500 x 800, its longer side capped at the slider's 256
    assert pixels[-1] >= 0.9 * min(canvas, affordable) and pixels[-1] <= canvas       # 0.9: rounding of h, w
    assert pixels[-1] > pixels[0] or pixels[0] == canvas                               # it grew from the preview
    assert browser.render_seconds <= (1 - share) * elapsed * 1.02 + affordable / rays_per_second
    if pixels[-1] < canvas:
        assert "lower training share" in live.clients[5].progress.content


@needs_viser
@pytest.mark.parametrize("rays_per_second", [2e3, 5e4])
def test_a_resting_camera_gets_ever_sharper_pictures_with_progress_shown(training_viewer, monkeypatch,
                                                                          rays_per_second):
    """view.py's loop (the networks never change): at rest, each picture has
    about REFINE times the pixels of the one before, from the preview to the
    capped canvas; the panel says how far the picture under way has come; a
    camera that moves gets a preview at once."""
    from nerf import viewer

    live = training_viewer
    live.training = False                           # view.py's viewer: no training panel
    browser = SimulatedBrowser(live, monkeypatch, rays_per_second)
    progress = set()
    while not browser.pictures or browser.pictures[-1][1:3] != (160, 256):
        assert browser.clock.now < 1000.0 + 60
        if not live.work(0.05):
            browser.clock.now += 0.01
        progress.add(live.clients[5].progress.content)
    pixels = [h * w for _, h, w, _ in browser.pictures]
    assert pixels[0] <= 1.1 * rays_per_second * viewer.PREVIEW_SECONDS
    assert all(a < b <= viewer.REFINE * a * 1.1 for a, b in zip(pixels, pixels[1:]))
    assert len(pixels) >= 3
    assert live.clients[5].progress.content == "**Picture** 256 x 160 of 256 x 160"
    if rays_per_second < 1e4:     # a last picture of many seconds: its progress is shown on the way
        assert any("refining: 256 x 160, " in text and not text.endswith(" 0%") for text in progress), progress
    browser.move(live)
    live.work(1.5 * viewer.PREVIEW_SECONDS)
    assert browser.pictures[-1][1] * browser.pictures[-1][2] == pixels[0]


@needs_viser
def test_preview_while_moving_then_sharper_up_to_the_browsers_own_cap(live_viewer):
    """Without rendering: a moving camera's picture is a preview of about
    PREVIEW_SECONDS' pixels at the canvas' aspect; at rest each next picture has
    at most REFINE times the pixels, up to the canvas capped by that browser's
    own Max resolution; redrawn when the networks change (training)."""
    from nerf import viewer

    live, _ = live_viewer
    live.stopped.set()        # no rendering thread: the test asks for the pictures itself
    time.sleep(0.3)
    live.rays_per_second = 200 / viewer.PREVIEW_SECONDS          # previews of about 200 pixels
    live.clients = {7: viewer.BrowserState(max_resolution=128), 8: viewer.BrowserState(max_resolution=64)}
    pose = viewer.browser_pose([1, 0, 0, 0], live.home)
    live.shown.clear()
    live.cameras = {7: viewer.BrowserCamera(pose, live.fov, 300, 400, 1, time.perf_counter())}
    picture = live._next_picture()
    assert picture.preview and picture.h * picture.w == pytest.approx(200, rel=0.15)
    assert picture.w / picture.h == pytest.approx(4 / 3, rel=0.15)
    assert (picture.full_h, picture.full_w) == (96, 128)         # the canvas, capped at this browser's 128
    live.shown[7] = viewer.Shown(1, picture.h, picture.w, False, time.perf_counter())
    assert live._next_picture() is None                          # moving: the preview stays
    live.cameras[7].changed_at -= viewer.REST_SECONDS
    pixels = [picture.h * picture.w]
    while (picture := live._next_picture()) is not None:
        assert not picture.preview and len(pixels) < 10
        pixels.append(picture.h * picture.w)
        live.shown[7] = viewer.Shown(1, picture.h, picture.w, (picture.h, picture.w) == (96, 128),
                                     time.perf_counter())
    assert (live.shown[7].h, live.shown[7].w) == (96, 128) and live.shown[7].full
    assert len(pixels) >= 3 and all(a < b <= viewer.REFINE * a * 1.1 for a, b in zip(pixels, pixels[1:]))
    picture = live._next_picture(redraw=True)                    # training changed the networks
    assert picture is not None and (picture.h, picture.w) == (96, 128)
    live.cameras[8] = viewer.BrowserCamera(pose, live.fov, 300, 400, 1, time.perf_counter())
    picture = live._next_picture()                               # another browser: its own cap
    assert picture.client_id == 8 and (picture.full_h, picture.full_w) == (48, 64)


@needs_viser
def test_training_takes_the_largest_share_any_browser_asks_for_and_each_browser_has_its_progress(training_viewer):
    """The share of time left to training is the largest any connected browser
    asks for (one browser cannot take training time the others have not given);
    at 1 nothing is rendered. Each browser's panel shows its own picture's size."""
    from nerf import viewer

    live = training_viewer
    assert live.training_share() == viewer.DEFAULT_TRAINING_SHARE          # no browser
    a, b = FakeBrowser(live, 21, height=12, width=16), FakeBrowser(live, 22, height=24, width=32)
    time.sleep(viewer.REST_SECONDS)
    while live.work(1.0):
        pass
    assert live.clients[21].progress.content == "**Picture** 16 x 12 of 16 x 12"
    assert live.clients[22].progress.content == "**Picture** 32 x 24 of 32 x 24"
    a.set("Training share", 0.3)
    assert live.training_share() == viewer.DEFAULT_TRAINING_SHARE          # b still asks for the default
    b.set("Training share", 0.5)
    assert live.training_share() == 0.5
    b.set("Training share", 1.0)
    rendered = []
    real_render = live._render_rays
    live._render_rays = lambda rays_o, rays_d: rendered.append(len(rays_o)) or real_render(rays_o, rays_d)
    a.send_camera(position=tuple(live.home + [0.0, 0.0, 0.2]))              # a moved: a picture is due
    live.render_credit = 10.0
    for step in range(3):
        live.training_step(step, {"loss": 0.1, "psnr": 20.0})
    assert rendered == []
    b.leave()
    assert live.training_share() == 0.3
    live.render_credit = 10.0     # saved up all it may: the picture is rendered
    live.training_step(3, {"loss": 0.1, "psnr": 20.0})
    assert rendered and live.shown[21].version == live.cameras[21].version


@pytest.mark.slow
@needs_viser
@needs_browser
def test_training_with_viewer_shows_the_scene_and_its_numbers(trained_demo, browser, tmp_path):
    """run_nerf.py --viewer, resumed from the trained demo: the page shows the
    red sphere (a preview: the picture is small while training takes 90% of
    the time) and the training panel's step, loss and PSNR while it trains."""
    demo_dir, basedir = trained_demo
    shutil.copytree(basedir / "demo", tmp_path / "demo")
    port = free_port()
    training = subprocess.Popen([sys.executable, str(ROOT / "run_nerf.py"), *demo_args(demo_dir, tmp_path),
                                 "--N_iters", "100000", "--i_weights", "100000", "--viewer",
                                 "--viewer_port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: training.poll() is None and socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60,
                 "the training viewer's port")
        browser.goto(f"http://127.0.0.1:{port}")
        wait_for(lambda: solid_fractions(browser.screenshot())["red"] > 0.01, 180, "the red sphere")   # a loaded machine: minutes
        wait_for(lambda: browser.get_by_text("Step").count() > 0 and browser.get_by_text("PSNR").count() > 0,
                 30, "the training numbers")
        assert training.poll() is None       # still training
    finally:
        training.terminate()
        _, err = training.communicate(timeout=60)
    assert training.returncode == 143, err       # SIGTERM: the step was saved


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_a_port_out_of_range_is_one_line(port):
    from nerf import viewer
    from nerf.errors import DataError

    with pytest.raises(DataError, match="--viewer_port: must be a port number from 1 to 65535"):
        viewer.check_port("127.0.0.1", port, "--viewer_port")


def test_a_render_only_run_never_checks_the_viewers_port():
    """A run folder's args.txt with viewer = True renders (--render_only) even
    while another process holds that port: render-only runs serve nothing."""
    from types import SimpleNamespace
    from nerf import viewer
    from nerf.errors import DataError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = SimpleNamespace(viewer=True, viewer_host="127.0.0.1", viewer_port=port, render_only=True)
        viewer.check_flag(args)
        if importlib.util.find_spec("viser") is not None:
            with pytest.raises(DataError, match="--viewer_port"):
                viewer.check_flag(SimpleNamespace(**{**vars(args), "render_only": False}))


# --- the browser as an untrusted client (issue 27, items 1, 2, 3, 5) ---


class FakeBrowser:
    """A browser as viser's server sees one: a connection whose messages go
    through viser's own handlers on the server's event loop, as a websocket's
    would; each call returns once the message has been handled."""

    def __init__(self, live, client_id: int, **camera):
        from viser import infra
        from viser.infra._async_message_buffer import AsyncMessageBuffer
        from viser.infra._infra import _ClientHandleState

        self.live, self.client_id = live, client_id
        self.websock = live.server._websock_server
        loop = live.server._event_loop
        self.connection = infra.WebsockClientConnection(
            client_id, _ClientHandleState(AsyncMessageBuffer(loop, persistent_messages=False), loop))
        for connect in list(self.websock._client_connect_cb):
            self.run(connect(self.connection))
        self.send_camera(**camera)         # viser counts a browser connected from its first camera

    def run(self, coroutine):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coroutine, self.live.server._event_loop).result(10)

    def send(self, message) -> None:
        self.run(self.websock._handle_incoming_message(self.client_id, message))
        self.run(self.connection._handle_incoming_message(self.client_id, message))

    def send_camera(self, wxyz=(1.0, 0.0, 0.0, 0.0), position=None, fov=0.8, height=24, width=32) -> None:
        from viser import _messages
        position = tuple(self.live.home) if position is None else position
        self.send(_messages.ViewerCameraMessage(wxyz, position, fov, 0.01, 1000.0, height, width, (0.0, 0.0, 0.0),
                                                (0.0, 0.0, 1.0)))

    @property
    def client(self):
        return self.live.server.get_clients()[self.client_id]

    def handle(self, label: str):
        (handle,) = [h for h in self.client.gui._gui_input_handle_from_uuid.values() if h.label == label]
        return handle

    def set(self, label: str, value) -> None:
        """What the browser sends when its user changes the panel's `label` field (or clicks that button)."""
        from viser import _messages
        self.send(_messages.GuiUpdateMessage(self.handle(label)._impl.uuid, {"value": value}))

    def leave(self) -> None:
        for disconnect in list(self.websock._client_disconnect_cb):
            self.run(disconnect(self.connection))


def viewer_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "nerf" and r.levelno >= 30]


@needs_viser
def test_a_browsers_share_request_publishes_nothing(training_viewer, monkeypatch, caplog):
    """viser would open a public tunnel (share.viser.studio) for any browser's
    ShareUrlRequest: the viewer hides the button and refuses the request."""
    import viser._viser
    from viser import _messages

    tunnels = []

    class RecordingTunnel:     # stands in for the tunnel: records, connects nowhere
        def __init__(self, *args, **kwargs):
            tunnels.append(args)

        def __getattr__(self, name):
            return lambda *args, **kwargs: "failed"

    monkeypatch.setattr(viser._viser, "ViserTunnel", RecordingTunnel)
    browser = FakeBrowser(training_viewer, 5)
    caplog.clear()
    for message in (_messages.ShareUrlRequest(), _messages.ShareUrlRequest(), _messages.ShareUrlDisconnect()):
        browser.send(message)
    time.sleep(0.5)     # viser's own handler ran on its thread pool: time for it to have started
    assert tunnels == []
    refusals = viewer_warnings(caplog)
    assert len(refusals) == 3 and all("share" in line and "refused" in line for line in refusals), refusals
    themes = [m for m in training_viewer.server._websock_server._broadcast_buffer.message_from_id.values()
              if isinstance(m, _messages.ThemeConfigurationMessage)]
    assert themes and not themes[-1].show_share_button


BAD_NUMBERS = [0, -1, -1e308, float("nan"), float("inf"), float("-inf"), 1e300, "x", None, [1.0], True]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_checked_number_clamps_or_refuses(value):
    from nerf import viewer
    for low, high, integer in ((0.1, 1.0, False), (32, 2048, True)):
        try:
            number, problem = viewer.checked_number(value, low, high, integer)
        except ValueError as exc:
            assert repr(value) in str(exc) or "NaN" in str(exc)
            assert isinstance(value, (str, list, bool, type(None))) or math.isnan(value)
            continue
        assert low <= number <= high and math.isfinite(number) and (not integer or isinstance(number, int))
        assert (problem is None) == (low <= value <= high)


def test_clamp_camera_sweep():
    """Every camera either comes out usable (a rotation, finite rays, fov and
    canvas in range) or is refused with a line; good cameras pass unchanged."""
    from nerf import viewer
    good = dict(wxyz=(1.0, 0.0, 0.0, 0.0), position=(0.0, -4.0, 1.0), fov=0.8, height=480, width=640)
    (pose, fov, h, w), problem = viewer.clamp_camera(**good)
    assert problem is None and (fov, h, w) == (0.8, 480, 640)
    np.testing.assert_allclose(pose, viewer.browser_pose(good["wxyz"], good["position"]))
    bad = {"fov": BAD_NUMBERS, "height": BAD_NUMBERS + [100000, 0.4], "width": BAD_NUMBERS + [100000],
           "wxyz": [(0, 0, 0, 0), (float("nan"), 0, 0, 0), (float("inf"), 0, 0, 0), (2.0, 0, 0, 0), (1e-300, 0, 0, 0),
                    "abcd", (1, 0, 0), None],
           "position": [(float("nan"), 0, 0), (0, float("inf"), 0), (1e30, 0, 0), "xyz", (1, 2), None]}
    refused = clamped = 0
    for name, values in bad.items():
        for value in values:
            try:
                (pose, fov, h, w), problem = viewer.clamp_camera(**{**good, name: value})
            except ValueError as exc:
                refused += 1
                assert str(exc) and "\n" not in str(exc)
                continue
            clamped += 1
            assert problem, (name, value)
            assert viewer.MIN_FOV <= fov <= viewer.MAX_FOV and 1 <= h <= viewer.MAX_CANVAS
            assert 1 <= w <= viewer.MAX_CANVAS and isinstance(h, int) and isinstance(w, int)
            np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)
            rays_o, rays_d = viewer.browser_rays(pose, fov, 4, 5, "cpu")
            assert rays_o.isfinite().all() and rays_d.isfinite().all()
    assert refused > 10 and clamped > 10


@needs_viser
def test_bad_values_from_a_browser_are_one_line_each_and_the_viewer_keeps_serving(training_viewer, caplog):
    """A sweep of bad camera and panel values sent as a browser sends them:
    each is one warning, the stored camera and settings stay usable, and the
    viewer goes on rendering finite pictures no larger than the resolution cap."""
    from nerf import viewer

    live = training_viewer
    browser = FakeBrowser(live, 3)
    browser.set("Max resolution", 32)
    pictures = []
    real_show = live._show
    live._show = lambda job: pictures.append((job.h, job.w, torch_finite(job))) or real_show(job)

    def render_and_check(what):
        camera = live.cameras[3]
        live.shown[3] = viewer.Shown(camera.version, 1, 1, False, 0.0)    # a preview on screen and the camera
        camera.changed_at -= viewer.REST_SECONDS            # at rest: sharper pictures up to the full one are next
        while live.work(1.0):
            pass
        assert pictures, what
        h, w, finite = pictures[-1]
        assert 1 <= h <= 32 and 1 <= w <= 32 and finite, (what, h, w)
        pictures.clear()

    bad_cameras = [dict(fov=v) for v in BAD_NUMBERS] + [dict(height=v) for v in BAD_NUMBERS + [100000]] + \
        [dict(width=v) for v in (0, float("nan"), 100000, "x")] + \
        [dict(wxyz=v) for v in ((0.0, 0.0, 0.0, 0.0), (float("nan"), 0.0, 0.0, 0.0), (2.0, 0.0, 0.0, 0.0), "abcd")] + \
        [dict(position=v) for v in ((float("nan"), 0.0, 0.0), (1e30, 0.0, 0.0), "xyz")]
    for n, camera in enumerate(bad_cameras):
        caplog.clear()
        before = live.cameras[3]
        browser.send_camera(**{"position": tuple(live.home + [0.0, 0.0, 0.01 * (n + 1)]), **camera})
        assert len(viewer_warnings(caplog)) == 1, (camera, viewer_warnings(caplog))
        stored = live.cameras[3]
        assert viewer.MIN_FOV <= stored.fov <= viewer.MAX_FOV and 1 <= stored.height <= viewer.MAX_CANVAS
        assert 1 <= stored.width <= viewer.MAX_CANVAS and np.isfinite(stored.pose).all()
        if "refused" in viewer_warnings(caplog)[0]:
            assert stored is before                           # the browser's previous camera stays
        else:
            render_and_check(camera)                          # a clamped camera renders
    fields = {"Max resolution": (0, -5, float("nan"), float("inf"), 1e9, "x", [1], None),
              "Training share": (0, -1, float("nan"), float("inf"), 2, "x"),
              "Seconds": (0, -1, float("nan"), float("inf"), 1e12, "x"),
              "FPS": (0, float("nan"), float("-inf"), 1e9, "x"),
              "Output": ("x", 1, None, "../../etc/passwd")}
    state = live.clients[3]
    for label, values in fields.items():
        for value in values:
            caplog.clear()
            browser.set(label, value)
            assert len(viewer_warnings(caplog)) == 1, (label, value, viewer_warnings(caplog))
            assert 32 <= state.max_resolution <= 2048 and 0.1 <= state.training_share <= 1.0
            assert 0.1 <= state.seconds <= viewer.MAX_SECONDS and 1 <= state.fps <= viewer.MAX_FPS
            assert state.output in viewer.OUTPUTS
            browser.set("Max resolution", 32)     # back to small pictures for the next render
    render_and_check("after the panel's values")
    caplog.clear()
    for share in (0.1, 1.0):      # the clamped ends of the range: no division by zero, the account bounded
        state.training_share = share
        live.training_step(1, {"loss": 0.1, "psnr": 20.0})
        live.training_step(2, {"loss": 0.1, "psnr": 20.0})
        most = viewer.PICTURE_SHARE * viewer.REFRESH_SECONDS * (1 - share)
        assert -most <= live.render_credit <= most and not viewer_warnings(caplog)


def torch_finite(job) -> bool:
    import torch
    return bool(all(torch.cat(values).isfinite().all() for values in job.maps.values()))


def call_handler(browser, result) -> None:
    """A handler's result: awaited on viser's loop when it is a coroutine (as viser does)."""
    import inspect
    if inspect.iscoroutine(result):
        browser.run(result)


@needs_viser
def test_a_camera_message_after_its_browser_left_is_dropped(training_viewer):
    """The disconnect handled before a late camera message of the same browser:
    the viewer keeps no camera for it, so training gives it no time."""
    live = training_viewer
    browser = FakeBrowser(live, 4)
    camera = browser.client.camera
    assert 4 in live.cameras
    browser.leave()
    assert 4 not in live.cameras
    camera._state.update_timestamp += 1.0       # a newer message, handled after the disconnect
    call_handler(browser, live._camera_moved(camera))
    time.sleep(0.2)
    assert live.cameras == {} and live.clients == {}
    worked = []
    live.work = lambda seconds: worked.append(seconds)
    live._render_rays = lambda rays_o, rays_d: worked.append(len(rays_o))      # no rendering of any kind
    for step in range(3):
        live.training_step(step, {"loss": 0.1, "psnr": 20.0})
    assert worked == []


@needs_viser
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1)])
def test_an_older_camera_message_never_overwrites_a_newer_one(training_viewer, order):
    """Camera messages handled in any order (as a thread pool may): the newest
    pose (by viser's time stamp) is the one kept."""
    from types import SimpleNamespace
    from nerf import viewer

    live = training_viewer
    browser = FakeBrowser(live, 6)
    stamp = time.time() + 10
    poses = [tuple(live.home + [0.0, 0.0, 0.1 * (k + 1)]) for k in range(3)]
    for k in order:
        camera = SimpleNamespace(client=browser.client, wxyz=np.array([1.0, 0, 0, 0]), position=np.array(poses[k]),
                                 fov=0.8, image_height=24, image_width=32, update_timestamp=stamp + k)
        call_handler(browser, live._camera_moved(camera))
    time.sleep(0.1)
    np.testing.assert_allclose(live.cameras[6].pose, viewer.browser_pose([1, 0, 0, 0], poses[2]))


@needs_viser
def test_the_first_camera_message_is_taken(training_viewer):
    """viser counts a browser connected from its first camera message; that
    message is the viewer's first camera for it, taken before viser has
    finished handling it (no thread pool in between)."""
    live = training_viewer
    FakeBrowser(live, 8, fov=0.7, height=30, width=40)
    camera = live.cameras[8]
    assert (camera.fov, camera.height, camera.width, camera.version) == (0.7, 30, 40, 1)


@needs_viser
def test_each_browser_has_its_own_panel_and_keyframes_and_a_new_one_starts_fresh(training_viewer):
    live = training_viewer
    a, b = FakeBrowser(live, 11), FakeBrowser(live, 12)
    a.set("Max resolution", 64)
    a.set("Output", "depth")
    a.set("Training share", 0.5)
    a.set("Seconds", 9.0)
    a.set("Add keyframe", True)
    a.send_camera(position=tuple(live.home + [0.0, 0.0, 0.2]))
    a.set("Add keyframe", True)
    defaults = (live.default_resolution, "RGB", 0.9, 4.0, 24.0, 0)

    def settings(browser):
        state = live.clients[browser.client_id]
        return (state.max_resolution, state.output, state.training_share, state.seconds, state.fps,
                len(state.keyframes))

    assert settings(a) == (64, "depth", 0.5, 9.0, 24.0, 2)
    assert settings(b) == defaults
    assert b.handle("Max resolution").value == live.default_resolution and b.handle("Output").value == "RGB"
    assert "2 keyframes" in live.clients[11].keyframe_count.content
    assert "0 keyframes" in live.clients[12].keyframe_count.content
    b.set("Save camera_path.json", True)            # b has no keyframes: nothing saved
    assert not (live.expdir / "camera_path.json").exists() or "add a keyframe" in \
        live.clients[12].keyframe_count.content
    a.leave()
    c = FakeBrowser(live, 13)
    assert settings(c) == defaults
    assert c.handle("Max resolution").value == live.default_resolution and c.handle("Seconds").value == 4.0
    assert 11 not in live.clients and set(live.clients) == {12, 13}


@needs_viser
def test_a_failed_picture_during_training_is_one_line_and_the_viewer_goes_on(training_viewer, caplog):
    """A render that raises (once) while training: one warning, and the next
    camera move is rendered again (the viewer is not switched off for the run)."""
    live = training_viewer
    browser = FakeBrowser(live, 9, height=12, width=16)
    real_render, failures = live._render_rays, []

    def render_failing_once(rays_o, rays_d):
        if not failures:
            failures.append(len(rays_o))
            raise RuntimeError("out of memory")
        return real_render(rays_o, rays_d)

    live._render_rays = render_failing_once
    live.clients[9].training_share = 0.1
    caplog.clear()
    for step, position in enumerate((live.home, live.home + [0.0, 0.0, 0.2])):
        browser.send_camera(position=tuple(position))
        live.render_credit = 10.0     # the viewer has saved up all it may: a picture is rendered
        live.training_step(step, {"loss": 0.1, "psnr": 20.0})
    assert failures and len(viewer_warnings(caplog)) == 1 and "out of memory" in viewer_warnings(caplog)[0]
    assert live.shown[9].version == live.cameras[9].version     # the moved camera's picture is on screen

    # view.py's loop likewise: it goes on serving after a failed picture.
    failures.clear()
    serving = threading.Thread(target=live.serve_forever, daemon=True)
    serving.start()
    browser.send_camera(position=tuple(live.home + [0.0, 0.0, 0.4]))
    failed_version = live.cameras[9].version
    wait_for(lambda: 9 in live.shown and (live.shown[9].version, live.shown[9].full) == (failed_version, True), 30,
             "the failed render, counted as shown")
    browser.send_camera(position=tuple(live.home + [0.0, 0.0, 0.6]))
    wait_for(lambda: 9 in live.shown and live.shown[9].version == failed_version + 1, 30, "the next picture")
    live.stopped.set()
    serving.join(10)
    assert len(failures) == 1 and len(viewer_warnings(caplog)) == 2
