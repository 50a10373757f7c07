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


@pytest.mark.slow
@needs_viser
@needs_browser
def test_view_py_shows_the_demo_solids_in_chromium(trained_demo, browser, tmp_path):
    demo_dir, basedir = trained_demo
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "view.py"), *demo_args(demo_dir, basedir),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        lines = [server.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("Viewing"):
            lines.append(server.stdout.readline())
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
    server = subprocess.Popen([sys.executable, str(ROOT / "view.py"), *demo_args(demo_dir, basedir),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        lines = [server.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("Viewing"):
            lines.append(server.stdout.readline())
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


@needs_viser
def test_training_with_a_watching_viewer_trains_exactly_as_without(trained_demo, tmp_path, monkeypatch):
    """The viewer renders between training steps (deterministic renders: no
    random numbers drawn), so the weights come out bit for bit the same."""
    import torch
    import run_nerf
    from nerf import viewer

    demo_dir, _ = trained_demo
    rendered = []
    real_training_viewer = viewer.training_viewer

    def watched(*args, **kwargs):
        live = real_training_viewer(*args, **kwargs)
        if live is not None:   # a browser that never receives its pictures keeps the viewer rendering
            live.cameras[-1] = viewer.BrowserCamera(viewer.browser_pose([1, 0, 0, 0], live.home), live.fov,
                                                    24, 32, 1, 0.0)
            live.training_share.value = 0.25   # a render every step or two, however fast the steps run
            real_render = live._render_whole
            live._render_whole = lambda picture: rendered.append(picture) or real_render(picture)
        return live

    monkeypatch.setattr(viewer, "training_viewer", watched)
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
    live.output.value = "RGB"
    np.testing.assert_array_equal(live.picture(job), np.round(rgb.reshape(h, w, 3) * 255))
    live.output.value = "accumulation"
    np.testing.assert_array_equal(live.picture(job), np.round(np.repeat(acc.reshape(h, w, 1), 3, -1) * 255))
    live.output.value = "depth"
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
    `width`, resting at the mean training camera), with a renderer of a known
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
def test_training_keeps_redrawing_whole_pictures_within_the_share(training_viewer, monkeypatch, rays_per_second,
                                                                  step_seconds, share):
    """Training steps (each changes the weights) with a browser at rest: every
    picture is rendered against one set of weights, a new picture arrives at
    least every REFRESH_SECONDS, the pictures grow (by at most REFINE times the
    pixels) up to the canvas or what the share pays for within a refresh
    period, and rendering takes no more than the share leaves it."""
    from nerf import viewer

    live = training_viewer
    browser = SimulatedBrowser(live, monkeypatch, rays_per_second)
    live.training_share.value = share
    start = browser.clock.now
    for step in range(int(12.0 / step_seconds)):       # 12 s of training
        browser.clock.now += step_seconds
        browser.weights += 1
        live.training_step(step, {"loss": 0.01, "psnr": 20.0})
    assert not live.failed
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
        assert "lower training share" in live.progress.content


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
    live.training_share = None                      # view.py's viewer: no training panel
    browser = SimulatedBrowser(live, monkeypatch, rays_per_second)
    progress = set()
    while not browser.pictures or browser.pictures[-1][1:3] != (160, 256):
        assert browser.clock.now < 1000.0 + 60
        if not live.work(0.05):
            browser.clock.now += 0.01
        progress.add(live.progress.content)
    pixels = [h * w for _, h, w, _ in browser.pictures]
    assert pixels[0] <= 1.1 * rays_per_second * viewer.PREVIEW_SECONDS
    assert all(a < b <= viewer.REFINE * a * 1.1 for a, b in zip(pixels, pixels[1:]))
    assert len(pixels) >= 3
    assert live.progress.content == "**Picture** 256 x 160 of 256 x 160"
    if rays_per_second < 1e4:     # a last picture of many seconds: its progress is shown on the way
        assert any("refining: 256 x 160, " in text and not text.endswith(" 0%") for text in progress), progress
    browser.move(live)
    live.work(1.5 * viewer.PREVIEW_SECONDS)
    assert browser.pictures[-1][1] * browser.pictures[-1][2] == pixels[0]


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
