"""The live viewer's speed on this machine, with a trained run (the demo by default).

    python benchmarks/viewer.py --config logs/demo_test/args.txt     # after run_nerf.py --config configs/demo.txt
    python benchmarks/viewer.py --config logs/demo_test/args.txt --screenshot docs/viewer.png

1. Pictures: a Viewer of the run's newest checkpoint serves headless Chromium
   (the system's, driven by Playwright). Reported: the time from the page's
   connection to its first picture, then pictures a second while the camera
   orbits (moved through viser's API 30 times a second for `--move_seconds`).
2. Training: `--steps` training steps of the same config (fresh weights in a
   temporary folder) with --viewer and a browser connected whose camera keeps
   orbiting. The viewer's hook after each step alternates, in blocks of
   `--block` steps, between not being called (plain training), being called as
   if no browser were connected, and being called normally (it then renders for
   the default share of the time); steps/s per mode, and as a ratio to plain
   training. Alternating within one run (each cycle of blocks in a random order)
   makes a shared machine's load hit the modes alike; the browser's own CPU use
   (software WebGL) slows all of them. `--no_browser`: no browser at all, plain
   steps against steps with the idle viewer's hook.
3. Refresh (`--only refresh`): `--refresh_steps` training steps with --viewer
   and a simulated browser (a 500 x 800 canvas resting at the mean training
   camera; its pictures are made, JPEG included, then dropped), alone and then
   beside `--busy` busy-loop processes: the seconds between pictures, their
   sizes, and the share of the time spent rendering (the default share leaves
   it 10%).
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nerf.omp_wait  # noqa: E402,F401 (before torch: OpenMP reads its wait policy when torch loads)
import run_nerf  # noqa: E402
from nerf import flags, viewer  # noqa: E402
from nerf.checkpoints import find_checkpoint  # noqa: E402
from nerf.datasets import load_scene  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
QUIET = ["--i_print", "1000000", "--i_img", "1000000", "--i_video", "1000000", "--i_testset", "1000000",
         "--i_weights", "1000000"]


def open_page(playwright, port: int, size=(800, 500)):
    browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.goto(f"http://127.0.0.1:{port}")
    return browser, page


class Orbit:
    """Turns every client's camera about the up direction through the look-at point, `rate` times a second."""

    def __init__(self, live: viewer.Viewer, degrees_per_second: float = 30.0, rate: float = 30.0):
        self.live, self.step, self.period = live, math.radians(degrees_per_second / rate), 1.0 / rate
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        up = self.live.up
        while not self.stop.is_set():
            for client in list(self.live.server.get_clients().values()):
                try:
                    camera = client.camera
                    offset = camera.position - camera.look_at
                except AssertionError:      # no camera message from this client yet
                    continue
                c, s = math.cos(self.step), math.sin(self.step)
                turned = offset * c + np.cross(up, offset) * s + up * np.dot(up, offset) * (1 - c)   # Rodrigues
                camera.position = camera.look_at + turned
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def count_pictures(cls):
    """Patches Viewer._show to log (time, full) of every picture sent."""
    shown = []
    real = cls._show

    def timed(self, job):
        real(self, job)
        shown.append((time.perf_counter(), job.full))
    cls._show = timed
    return shown


def measure_pictures(args, argv) -> None:
    from playwright.sync_api import sync_playwright

    run_args = flags.parse_args(run_nerf.config_parser(), argv)
    scene = load_scene(run_args)
    expdir = Path(run_args.basedir) / str(run_args.expname)
    ckpt_path, ckpt = find_checkpoint(expdir, run_args.ft_path, False)
    _, render_kwargs, step, _, _ = run_nerf.create_nerf(run_args, None, ckpt, ckpt_path)
    render_kwargs.update(near=scene.near, far=scene.far)
    connected = []
    real_connect = viewer.Viewer._connect

    async def timed_connect(self, client):
        connected.append(time.perf_counter())
        await real_connect(self, client)

    viewer.Viewer._connect = timed_connect
    shown = count_pictures(viewer.Viewer)
    live = viewer.Viewer(scene, render_kwargs, flags.choose_device(None), expdir, port=args.port)
    thread = threading.Thread(target=live.serve_forever, daemon=True)
    thread.start()
    print(f"checkpoint {ckpt_path} (step {step}); scene {scene.H}x{scene.W}; "
          f"{live.rays_per_second:.0f} rays/s measured at start")
    with sync_playwright() as playwright:
        browser, page = open_page(playwright, args.port, (1100, 520) if args.screenshot else (800, 500))
        deadline = time.time() + 30
        while not shown and time.time() < deadline:
            time.sleep(0.01)
        print(f"first picture {shown[0][0] - connected[0]:.3f} s after the page connected "
              f"({'full' if shown[0][1] else 'preview'})")
        time.sleep(2.0)
        if args.screenshot:
            (client,) = live.server.get_clients().values()
            pose = scene.poses[scene.i_test[args.screenshot_view]]
            live.show_cameras.value = False
            live._show_frustums(False)
            time.sleep(1.0)
            live._go_to(client, pose)
            time.sleep(1.0)
            n_shown = len(shown)
            while time.time() < deadline + 90 and not any(full for _, full in shown[n_shown:]):
                time.sleep(0.1)
            time.sleep(0.5)
            page.evaluate("for (const el of document.querySelectorAll('[class*=Notification-root]')) el.remove()")
            page.screenshot(path=args.screenshot)
            print(f"screenshot: {args.screenshot}")
        start = len(shown)
        t0 = time.perf_counter()
        with Orbit(live):
            time.sleep(args.move_seconds)
        moving = [t for t, _ in shown[start:] if t <= t0 + args.move_seconds]
        print(f"while the camera orbits: {len(moving) / args.move_seconds:.1f} pictures/s "
              f"over {args.move_seconds:.0f} s ({live.rays_per_second:.0f} rays/s now)")
        browser.close()
    live.stop()
    viewer.Viewer._connect = real_connect


def measure_training(args, argv) -> None:
    """One --viewer training run with a browser connected and orbiting; the
    viewer hook alternates, in blocks of `--block` steps, between three modes:
    not called (plain training), called as if no browser were connected, and
    called normally (rendering for the default share). Each step's time (from
    the end of one training step to the end of the next, the hook included)
    counts for the mode of the hook in between, so machine load hits all
    three modes alike."""
    from playwright.sync_api import sync_playwright

    modes = ("plain", "viewer, no browser") if args.no_browser else \
        ("plain", "viewer, no browser", "viewer, browser orbiting")
    rng = np.random.default_rng(0)      # each cycle of blocks in its own order: no mode always follows another
    order = [mode for _ in range(args.steps // (args.block * len(modes)) + 2) for mode in rng.permutation(modes)]
    times = {mode: [] for mode in modes}
    state = {"last": None, "step": 0}
    real_step = run_nerf.train_step

    def timed_step(*a, **kw):
        out = real_step(*a, **kw)
        now = time.perf_counter()
        if state["last"] is not None and state["step"] > args.warmup:
            times[state["mode"]].append(now - state["last"])    # the mode of the hook in between
        state["last"], state["step"] = now, state["step"] + 1
        return out

    def hooked(live):
        real_hook = live.training_step

        def hook(step, stats):
            state["mode"] = order[step // args.block]
            if state["mode"] == "plain":
                live.last_call = time.perf_counter()
            elif state["mode"] == "viewer, no browser":
                cameras, live.cameras = live.cameras, {}
                real_hook(step, stats)
                live.cameras = cameras
            else:
                real_hook(step, stats)
        return hook

    real_viewer = viewer.training_viewer
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as tmp:
        def with_browser(*a, **kw):
            live = real_viewer(*a, **kw)
            if not args.no_browser:
                state["page"] = open_page(playwright, live.server.get_port())
                deadline = time.time() + 30
                while not live.cameras and time.time() < deadline:
                    time.sleep(0.05)
                state["orbit"] = Orbit(live).__enter__()
            state["idle_hook"] = live.training_step
            live.training_step = hooked(live)
            return live

        run_nerf.train_step, viewer.training_viewer = timed_step, with_browser
        code = run_nerf.main(argv + ["--basedir", tmp, "--expname", "bench", "--no_reload",
                                     "--N_iters", str(args.steps), "--viewer", "--viewer_port", str(args.port + 1),
                                     *QUIET])
        if not args.no_browser:
            state.pop("orbit").__exit__()
            state.pop("page")[0].close()
        assert code == 0, code
    if args.no_browser:     # the idle hook's own cost, timed alone: a load-independent figure
        calls = 100000
        start = time.perf_counter()
        for k in range(calls):
            state["idle_hook"](k, {})
        per_call = (time.perf_counter() - start) / calls
        print(f"the hook with no browser: {per_call * 1e6:.2f} us a call, "
              f"{per_call / np.median(times['plain']):.2e} of a median plain step")
    plain, plain_median = np.mean(times["plain"]), np.median(times["plain"])
    for mode in modes:
        mean, median = np.mean(times[mode]), np.median(times[mode])
        print(f"{mode:26s} {1 / mean:.2f} steps/s over {len(times[mode])} steps: {plain / mean:.3f} of plain "
              f"training's steps/s (by the median step time: {plain_median / median:.3f})")


def busy_loops(n: int) -> list:
    """n processes that keep a core busy each (the load of a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure_refresh(args, argv) -> None:
    """--viewer training runs (fresh weights, `--refresh_steps` steps each) with
    a simulated browser: a 500 x 800 canvas resting at the mean training camera,
    as viser would report it, whose pictures are made (JPEG included) and then
    dropped. First with nothing else started, then beside `--busy` busy-loop
    processes. Reported: the seconds between pictures, their sizes, and the
    share of the time spent rendering."""
    real_viewer = viewer.training_viewer
    for load in (0, args.busy):
        pictures, rendering, created, steps = [], [], [], []

        def simulated(*a, **kw):
            live = real_viewer(*a, **kw)
            client = SimpleNamespace(scene=SimpleNamespace(
                set_background_image=lambda image, **_: pictures.append((time.perf_counter(), *image.shape[:2]))))
            live.server.get_clients = lambda: {1: client}
            created.append(time.perf_counter())
            live.cameras[1] = viewer.BrowserCamera(viewer.browser_pose([1, 0, 0, 0], live.home), live.fov, 500, 800,
                                                   1, time.perf_counter())
            real_render = live._render_whole

            def timed(picture):
                start = time.perf_counter()
                real_render(picture)
                rendering.append(time.perf_counter() - start)
            live._render_whole = timed
            real_hook = live.training_step
            live.training_step = lambda step, stats: steps.append(time.perf_counter()) or real_hook(step, stats)
            return live

        busy = busy_loops(load)
        viewer.training_viewer = simulated
        try:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                code = run_nerf.main(argv + ["--basedir", tmp, "--expname", "bench", "--no_reload", "--N_iters",
                                             str(args.refresh_steps), "--viewer", "--viewer_port",
                                             str(args.port + 2), *QUIET])
                elapsed = time.perf_counter() - start
        finally:
            viewer.training_viewer = real_viewer
            for process in busy:
                process.kill()
                process.wait()
        assert code == 0, code
        times = np.array(created + [at for at, _, _ in pictures])
        gaps = np.diff(times[1:])
        sizes = [f"{w}x{h}" for _, h, w in pictures]
        print(f"{load} busy processes (load average {os.getloadavg()[0]:.1f}): {len(pictures)} pictures in "
              f"{elapsed:.0f} s of training; the first {times[1] - times[0]:.1f} s after the viewer started; between pictures: "
              f"median {np.median(gaps):.2f} s, max {gaps.max():.2f} s; sizes {sizes[0]} .. largest "
              f"{max(sizes, key=lambda s: int(s.split('x')[0]))}, last {sizes[-1]} (canvas capped at 256x160); "
              f"rendering {sum(rendering) / elapsed:.1%} of the time; training steps (with the viewer's turn after "
              f"each): median {np.median(np.diff(steps)):.2f} s, longest {np.diff(steps).max():.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the trained run's config (or its args.txt)")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--move_seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--warmup", type=int, default=6, help="first steps not counted")
    parser.add_argument("--block", type=int, default=5, help="steps in a row in one mode")
    parser.add_argument("--no_browser", action="store_true",
                        help="training part without any browser: plain steps against the idle viewer's")
    parser.add_argument("--screenshot", help="also save a screenshot of a test view here")
    parser.add_argument("--screenshot_view", type=int, default=0)
    parser.add_argument("--refresh_steps", type=int, default=300, help="training steps of each refresh run")
    parser.add_argument("--busy", type=int, default=3, help="busy-loop processes beside the loaded refresh run")
    parser.add_argument("--only", choices=["pictures", "training", "refresh"], help="run only this part")
    parser.add_argument("--skip", choices=["pictures", "training", "refresh"], help="leave out one part")
    args, rest = parser.parse_known_args()
    argv = ["--config", args.config, *rest]
    for part, measure in (("pictures", measure_pictures), ("training", measure_training),
                          ("refresh", measure_refresh)):
        if args.skip != part and args.only in (None, part):
            measure(args, argv)


if __name__ == "__main__":
    main()
