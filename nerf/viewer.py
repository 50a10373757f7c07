"""The live web viewer: a NeRF rendered from each browser's camera, served with viser.

`Viewer` starts a viser server showing the training cameras (frustums with their
images: a click moves the view there) and renders the scene from every connected
browser's camera, refining progressively: a moving camera gets a preview (sized
from the measured rendering speed so that it takes about `PREVIEW_SECONDS`);
once the camera has rested for `REST_SECONDS`, each picture has `REFINE` times
the pixels of the one before, up to the full canvas (capped by the browser's
resolution slider). Each browser's panel says which resolution is on its
screen and how far the next one has come.

All rendering happens in the thread that calls `work(seconds)` or
`training_step`. view.py calls `work` in a loop: a picture proceeds in slices of
rays between checks of the clock, and a refinement is dropped as soon as the
camera moves again. Training calls `training_step` after each step, which
renders for a share of the time (each browser's slider "training share" is
the fraction of time it leaves to training; training gets the largest any
connected browser asks for, see `Viewer.training_share`). There every picture is rendered whole within one
call, against one set of weights, and sized so that the share pays for it
within `REFRESH_SECONDS`: a picture at rest is redrawn as the weights change, at
the largest size that keeps it that fresh. With no browser connected
`training_step` does nothing but check a flag, and it never reads the step's
numbers from the device.

Cameras: viser's are OpenCV-style and NeRF's OpenGL-style (see
nerf/camera_path.py). Forward-facing scenes are rendered in NDC as in training:
rays from the browser's camera are mapped with the training camera's NDC.

Keyframes added in the panel are saved as `camera_path.json` (nerfstudio's
format) in the run folder, to render with `run_nerf.py --render_only --camera_path`.

The browser is untrusted: viser's *Share* button (a public tunnel) is hidden and
its requests refused; every camera and panel value a browser sends is checked
(`clamp_camera`, `checked_number`, `checked_choice`): clamped into range or
refused with one logged line, and the viewer goes on serving. Each browser has
its own panel (settings and progress line) and keyframes (`BrowserState`; the
training cameras' switch is shared, as the scene is); its handlers run
in order on viser's event loop (async callbacks), so a camera message is never
overtaken by an older one, and one that arrives after its browser left is dropped.
"""
import contextlib
import importlib.util
import io
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from nerf import camera_path, geometry, outputs, run_folder
from nerf.errors import DataError, WriteError
from nerf.rendering import render
import run_nerf_helpers as helpers     # get_rays looked up at call time: a fork may replace it

log = logging.getLogger("nerf")

PREVIEW_SECONDS = 0.06    # a moving camera's picture takes about this long to render
REST_SECONDS = 0.2        # a camera still for this long gets sharper pictures
REFINE = 4                # each sharper picture has about this many times the pixels of the one before
SLICE_SECONDS = 0.02      # rays rendered between checks of the clock and the camera
DEFAULT_TRAINING_SHARE = 0.9
REFRESH_SECONDS = 2.0     # during training, a picture on screen is redrawn at least this often
PICTURE_SHARE = 0.5       # during training, the part of a refresh period's rendering time one picture may take
PROGRESS_SECONDS = 0.5    # the panel's progress line changes at most this often
OUTPUTS = ("RGB", "depth", "accumulation")
MIN_FOV, MAX_FOV = math.radians(1.0), math.radians(170.0)   # a browser's vertical field of view is kept in here
MAX_CANVAS = 8192         # a browser's canvas is taken as at most this many pixels a side
MAX_POSITION = 1e6        # a camera farther than this from the origin is refused (float32 rays)
MAX_SECONDS, MAX_FPS = 600.0, 120.0    # a saved camera path: at most 72000 frames


def quiet_stdout():
    """A context in which nothing printed reaches stdout: viser prints its banner
    on start and a line on stop whatever its `verbose` says (the programs print
    their own line with the address)."""
    return contextlib.redirect_stdout(io.StringIO())


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """DataError naming `flag` unless (host, port) can be bound now (by a server that reuses addresses)."""
    if not 1 <= port <= 65535:
        raise DataError(flag, f"must be a port number from 1 to 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds: a closed
        try:                                                          # connection's TIME_WAIT is no conflict
            sock.bind((host, port))
        except OSError as exc:
            raise DataError(flag, f"cannot serve on {host}:{port} ({exc.strerror or exc}); "
                                  "is another viewer running there? pick another port") from None


def look_at_point(poses: np.ndarray) -> np.ndarray:
    """The point (3,) nearest, in least squares, to every camera's optical axis
    (poses (N, 3, 4), OpenGL: looking along -z); for nearly parallel axes (a
    forward-facing capture) the point two units ahead of the mean camera."""
    centres, forwards = poses[:, :3, 3], -poses[:, :3, 2]
    forwards = forwards / np.linalg.norm(forwards, axis=-1, keepdims=True)
    projectors = np.eye(3)[None] - forwards[:, :, None] * forwards[:, None, :]   # onto each axis' normal plane
    A, b = projectors.sum(0), np.einsum("nij,nj->i", projectors, centres)
    mean_centre, mean_forward = centres.mean(0), forwards.mean(0)
    if np.linalg.cond(A) < 1e3:
        point = np.linalg.solve(A, b)
        if np.dot(point - mean_centre, mean_forward) > 0:
            return point
    return mean_centre + 2.0 * mean_forward / np.linalg.norm(mean_forward)


def wxyz_from_matrix(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation matrix (3, 3) (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    trace = np.trace(R)
    if trace > 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k])
        q = [0.0] * 4
        q[0], q[1 + i] = (R[k, j] - R[j, k]) / s, 0.25 * s
        q[1 + j], q[1 + k] = (R[j, i] + R[i, j]) / s, (R[k, i] + R[i, k]) / s
    q = np.array(q)
    return q / np.linalg.norm(q) * (1 if q[0] >= 0 else -1)


def matrix_from_wxyz(wxyz: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) of a unit quaternion (w, x, y, z)."""
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(wxyz)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def browser_pose(wxyz: np.ndarray, position: np.ndarray) -> np.ndarray:
    """viser's camera (OpenCV-style orientation and position) as a NeRF pose (4, 4), OpenGL-style."""
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = matrix_from_wxyz(wxyz), position
    return camera_path.opencv_to_opengl(c2w)


def viser_camera(pose: np.ndarray):
    """A NeRF pose (3 or 4, 4), OpenGL-style, as viser's (wxyz, position), OpenCV-style."""
    c2w = camera_path.opengl_to_opencv(camera_path.as_pose(pose))
    return wxyz_from_matrix(c2w[:3, :3]), c2w[:3, 3].copy()


def picture_size(canvas_h: int, canvas_w: int, pixels: float) -> tuple:
    """(h, w) with the canvas' aspect and about `pixels` pixels, never above the canvas, at least 1x1."""
    scale = min(1.0, math.sqrt(max(pixels, 1.0) / (canvas_h * canvas_w)))
    return max(1, round(canvas_h * scale)), max(1, round(canvas_w * scale))


def checked_number(value: Any, low: float, high: float, integer: bool = False) -> tuple:
    """(number, problem) for a value a browser sent: the number clamped into
    [low, high] (rounded when `integer`), and a line saying what was clamped or
    None when nothing was. Raises ValueError (the line) for what is not a finite
    or infinite real number: NaN, strings, lists, None, booleans."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if math.isnan(number):
        raise ValueError("NaN is not a number")
    checked = min(max(number, low), high)
    problem = None if checked == number else f"{value!r} is outside {low:g}..{high:g}; using {checked:g}"
    return (round(checked) if integer else checked), problem


def checked_choice(value: Any, choices: Sequence[str]) -> str:
    """The value if it is one of `choices`, else ValueError (the line)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def clamp_camera(wxyz: Any, position: Any, fov: Any, height: Any, width: Any) -> tuple:
    """A browser's camera checked: ((pose (4, 4) OpenGL, fov in radians, height,
    width), problem). The fov is clamped into [MIN_FOV, MAX_FOV] and the canvas
    into 1..MAX_CANVAS pixels a side, a quaternion (w, x, y, z) of a length other
    than 1 is normalised; problem is the line saying so, or None. Raises
    ValueError (the line) for a camera that cannot be used: a quaternion or
    position that is not 4 or 3 finite numbers, a zero quaternion, a position
    beyond MAX_POSITION, a fov or canvas size that is not a number."""
    try:
        q = np.asarray(wxyz, dtype=np.float64).reshape(4)
        t = np.asarray(position, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise ValueError(f"orientation {wxyz!r} or position {position!r} is not 4 and 3 numbers") from None
    if not (np.isfinite(q).all() and np.isfinite(t).all()):
        raise ValueError(f"orientation {q.tolist()} or position {t.tolist()} is not finite")
    if np.abs(t).max() > MAX_POSITION:
        raise ValueError(f"position {t.tolist()} is farther than {MAX_POSITION:g} from the origin")
    length = float(np.linalg.norm(q))
    if length < 1e-6:
        raise ValueError(f"orientation {q.tolist()} is not a rotation")
    problems = [] if abs(length - 1.0) <= 1e-3 else [f"orientation of length {length:g} normalised"]
    checked = []
    for name, value, low, high, integer in (("fov", fov, MIN_FOV, MAX_FOV, False),
                                            ("canvas height", height, 1, MAX_CANVAS, True),
                                            ("canvas width", width, 1, MAX_CANVAS, True)):
        try:
            number, problem = checked_number(value, low, high, integer)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        checked.append(number)
        if problem:
            problems.append(f"{name}: {problem}")
    return (browser_pose(q / length, t), *checked), "; ".join(problems) or None


def progress_text(shown: tuple, canvas: tuple, refining: Optional[tuple] = None, training: bool = False) -> str:
    """The panel's line on the picture: the size (h, w) on screen out of the
    capped canvas (h, w); refining (h, w, fraction done) for a sharper picture
    under way; training: a picture short of the canvas is what the share allows
    (the largest any browser asks for: `Viewer.training_share`)."""
    text = f"**Picture** {shown[1]} x {shown[0]} of {canvas[1]} x {canvas[0]}"
    if refining is not None:
        text += f"; refining: {refining[1]} x {refining[0]}, {100 * refining[2]:.0f}%"
    elif training and tuple(shown) != tuple(canvas):
        text += " (more: a lower training share, in every browser watching)"
    return text


def browser_rays(pose: np.ndarray, fov: float, h: int, w: int, device) -> tuple:
    """The rays of a camera (OpenGL pose (4, 4), vertical fov in radians) at
    h x w pixels, principal point at the centre: rays_o, rays_d, each (h w, 3)."""
    f = 0.5 * h / math.tan(0.5 * fov)
    K = np.array([[f, 0, 0.5 * w], [0, f, 0.5 * h], [0, 0, 1]])
    c2w = torch.as_tensor(np.asarray(pose)[:3, :4], dtype=torch.float32, device=device)
    rays_o, rays_d = helpers.get_rays(h, w, K, c2w)
    return rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)


def render_world_rays(scene, render_kwargs: dict, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple:
    """rgb (n, 3), disp (n,), acc (n,) of world-space rays (n, 3) each; forward-facing
    scenes through the training camera's NDC (render's H, W, focal are the
    scene's), whatever camera the rays come from."""
    with torch.no_grad():
        rgb, disp, acc, _ = render(scene.H, scene.W, scene.K, chunk=len(rays_o), rays=(rays_o, rays_d),
                                   **render_kwargs)
    return rgb, disp, acc


@dataclass
class BrowserCamera:
    """One browser's latest camera: OpenGL pose (4, 4), vertical fov (radians),
    canvas size, a version counting its changes, and viser's time stamp of the
    message (older messages are dropped)."""
    pose: np.ndarray
    fov: float
    height: int
    width: int
    version: int
    changed_at: float
    stamp: float = 0.0


@dataclass
class BrowserState:
    """One browser's own settings (checked values from its panel), keyframes
    [(pose (4, 4), fov in degrees), ...] and the handles of its panel (its progress
    line: last written at `progress_at`, time.perf_counter); a new browser starts
    from the defaults."""
    max_resolution: int
    output: str = "RGB"
    training_share: float = DEFAULT_TRAINING_SHARE
    seconds: float = 4.0
    fps: float = 24.0
    keyframes: List[tuple] = field(default_factory=list)
    keyframe_count: Any = None     # markdown handles of its panel
    stats: Any = None
    progress: Any = None
    progress_at: float = 0.0


@dataclass
class Shown:
    """The picture on a client's screen: its camera's version, its size, whether
    it fills the (capped) canvas, and when it was drawn (time.perf_counter)."""
    version: int
    h: int
    w: int
    full: bool
    at: float


class Picture(NamedTuple):
    """The next picture to render for a client: h x w pixels of its camera;
    full: the whole (capped) canvas, full_h x full_w; preview: for a camera that moved."""
    client_id: int
    camera: BrowserCamera
    h: int
    w: int
    full_h: int
    full_w: int
    preview: bool


@dataclass
class RenderJob:
    """A picture being rendered for a client, slice by slice: its rays (n, 3)
    each, and the maps rendered so far. preview: a moving camera's picture
    (finished even if the camera moves on); canvas: the full picture's (h, w)."""
    client_id: int
    version: int
    full: bool
    h: int
    w: int
    rays_o: torch.Tensor
    rays_d: torch.Tensor
    preview: bool = True
    canvas: tuple = (0, 0)
    done: int = 0
    maps: Dict[str, List[torch.Tensor]] = field(default_factory=lambda: {"rgb": [], "disp": [], "acc": []})


class Viewer:
    """Serves `render_kwargs`' networks (test-time kwargs with near/far) on host:port.

    scene: the loaded Scene (training cameras, images, intrinsics); expdir: where
    camera_path.json goes; training: show the training panel (step, loss, PSNR,
    training share)."""

    def __init__(self, scene, render_kwargs: dict, device: torch.device, expdir: Path, host: str = "127.0.0.1",
                 port: int = 8080, training: bool = False, port_flag: str = "--port"):
        import viser    # optional dependency: requirements-viewer.txt

        check_port(host, port, port_flag)
        logging.getLogger("websockets").setLevel(logging.WARNING)    # its "server listening", "closing"...
        self.scene, self.render_kwargs, self.device, self.expdir = scene, render_kwargs, device, Path(expdir)
        self.ndc = render_kwargs.get("ndc", True)
        self.training = training
        self.lock = threading.Lock()
        self.clients: Dict[int, BrowserState] = {}    # the connected browsers
        self.cameras: Dict[int, BrowserCamera] = {}
        self.shown: Dict[int, Shown] = {}        # client id -> the picture on its screen
        self.job: Optional[RenderJob] = None
        self.rays_per_second = 0.0
        self.render_credit = 0.0                 # training: seconds of rendering the share has paid for
        self.last_stats_at = 0.0
        self.last_call: Optional[float] = None
        self.stopped = threading.Event()

        with quiet_stdout():
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        if self.server.get_port() != port:     # taken between the check and the start
            self._stop_server()
            raise DataError(port_flag, f"port {port} on {host} is in use; pick another port")
        self._refuse_sharing()
        self._set_up_scene()
        longest = max(self.scene.H, self.scene.W)
        self.resolution_range = (32, max(2048, longest))
        self.default_resolution = max(256, longest)
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)
        self._measure_speed()

    # --- scene and panel ---

    def _refuse_sharing(self) -> None:
        """No Share button, and a browser's share request (which would publish
        the server through viser's public tunnel) is answered with a log line."""
        from viser import _messages

        self.server.gui.configure_theme(show_share_button=False)
        connection = self.server._websock_server     # viser registers its tunnel handlers there
        for message in (_messages.ShareUrlRequest, _messages.ShareUrlDisconnect):
            connection.unregister_handler(message)
            connection.register_handler(message, self._share_requested)

    async def _share_requested(self, client_id: int, message) -> None:
        log.warning("viewer: browser %s asked to share the viewer on the internet: refused", client_id)

    def _set_up_scene(self) -> None:
        scene = self.scene
        train_poses = scene.poses[scene.i_train]
        up = train_poses[:, :3, 1].mean(0)
        self.up = up / np.linalg.norm(up)
        self.fov = 2.0 * math.atan(0.5 * scene.H / scene.focal)
        self.server.scene.set_up_direction(tuple(self.up))
        target = look_at_point(train_poses)
        offsets = train_poses[:, :3, 3] - target
        distances = np.linalg.norm(offsets, axis=-1)
        direction = (offsets / distances[:, None]).mean(0)
        self.home = target + direction / np.linalg.norm(direction) * distances.mean()   # the mean camera
        initial = self.server.initial_camera
        initial.position, initial.look_at, initial.up, initial.fov = self.home, target, self.up, self.fov
        extent = distances.mean()
        size = max(1, max(scene.H, scene.W) // 64)
        self.frustums = []
        for i in scene.i_train:
            wxyz, position = viser_camera(scene.poses[i])
            thumbnail = (np.asarray(scene.images[i])[::size, ::size, :3] * 255).round().astype(np.uint8)
            frustum = self.server.scene.add_camera_frustum(
                f"/training_cameras/{int(i)}", fov=self.fov, aspect=scene.W / scene.H, scale=0.04 * extent,
                image=thumbnail, format="jpeg", wxyz=wxyz, position=position, color=(40, 40, 200),
                thickness=1.5, thickness_units="screen")
            frustum.on_click(lambda event, i=int(i): self._go_to(event.client, self.scene.poses[i]))
            self.frustums.append(frustum)
        # One scene for every browser (per-browser frustums made the first full picture take 1.5-2x as
        # long with a software-rendering browser on the same CPU), so its switch is shared and always true.
        self.show_cameras = self.server.gui.add_checkbox("Training cameras", initial_value=True)
        self.show_cameras.on_update(lambda _: self._show_frustums(bool(self.show_cameras.value)))

    def _set_up_panel(self, client, state: BrowserState) -> None:
        """This browser's own panel; every value it sends is checked (`_on_value`)."""
        gui = client.gui
        output = gui.add_dropdown("Output", OUTPUTS, initial_value=state.output)
        self._on_value(client, output, "output", lambda value: (checked_choice(value, OUTPUTS), None), redraw=True)
        low, high = self.resolution_range
        resolution = gui.add_slider("Max resolution", min=low, max=high, step=16, initial_value=state.max_resolution)
        self._on_value(client, resolution, "max_resolution", lambda value: checked_number(value, low, high, True),
                       redraw=True)
        state.progress = gui.add_markdown("**Picture** waiting for a camera")
        if self.training:
            state.stats = gui.add_markdown("Training: starting")
            share = gui.add_slider("Training share", min=0.1, max=1.0, step=0.05, initial_value=state.training_share)
            self._on_value(client, share, "training_share", lambda value: checked_number(value, 0.1, 1.0))
        with gui.add_folder("Camera path"):
            seconds = gui.add_number("Seconds", initial_value=state.seconds, min=0.1, max=MAX_SECONDS, step=0.1)
            self._on_value(client, seconds, "seconds", lambda value: checked_number(value, 0.1, MAX_SECONDS))
            fps = gui.add_number("FPS", initial_value=state.fps, min=1, max=MAX_FPS, step=1)
            self._on_value(client, fps, "fps", lambda value: checked_number(value, 1.0, MAX_FPS))
            state.keyframe_count = gui.add_markdown("0 keyframes")

            async def add_keyframe(_):
                self._add_keyframe(client.client_id)

            async def clear_keyframes(_):
                self._clear_keyframes(client.client_id)

            async def save(_):
                self._save_camera_path(client.client_id)

            gui.add_button("Add keyframe").on_click(add_keyframe)
            gui.add_button("Clear keyframes").on_click(clear_keyframes)
            gui.add_button("Save camera_path.json").on_click(save)

    def _check_panel_messages(self, client) -> None:
        """viser converts a panel value to the field's type before any callback
        (float("x") raises on its event loop): such a value is one log line."""
        from viser import _messages

        connection, handle_update = client._websock_connection, client.gui._handle_gui_updates

        async def checked(client_id: int, message) -> None:
            try:
                await handle_update(client_id, message)
            except (AssertionError, TypeError, ValueError, OverflowError) as exc:
                log.warning("viewer: browser %s: a panel value of the wrong type: %s; ignored", client_id, exc)

        connection.unregister_handler(_messages.GuiUpdateMessage, handle_update)
        connection.register_handler(_messages.GuiUpdateMessage, checked)

    def _on_value(self, client, handle, setting: str, check, redraw: bool = False) -> None:
        """On a change of `handle` by the browser: check(value) -> (value,
        problem) (ValueError to refuse it), a log line for a problem, then the
        checked value goes into the browser's `setting`."""
        async def update(_) -> None:
            client_id = client.client_id
            try:
                value, problem = check(handle.value)
            except ValueError as exc:
                log.warning("viewer: browser %s: %s: %s; ignored", client_id, handle.label, exc)
                return
            if problem:
                log.warning("viewer: browser %s: %s: %s", client_id, handle.label, problem)
            with self.lock:
                state = self.clients.get(client_id)
                if state is None:
                    return
                setattr(state, setting, value)
                if redraw:
                    self.shown.pop(client_id, None)

        handle.on_update(update)

    def _show_frustums(self, visible: bool) -> None:
        for frustum in self.frustums:
            frustum.visible = visible

    def _go_to(self, client, pose: np.ndarray) -> None:
        if client is None:
            return
        wxyz, position = viser_camera(pose)
        with client.atomic():
            client.camera.wxyz = wxyz
            client.camera.position = position

    # --- browsers: viser runs these async handlers one at a time on its event loop, in message order ---

    async def _connect(self, client) -> None:
        """A new browser: its own state and panel; viser calls
        this on the browser's first camera message, which is taken here."""
        state = BrowserState(max_resolution=self.default_resolution)
        with self.lock:
            self.clients[client.client_id] = state
        self._check_panel_messages(client)
        self._set_up_panel(client, state)
        client.camera.on_update(self._camera_moved)
        await self._camera_moved(client.camera)

    async def _disconnect(self, client) -> None:
        with self.lock:
            self.clients.pop(client.client_id, None)
            self.cameras.pop(client.client_id, None)
            self.shown.pop(client.client_id, None)

    async def _camera_moved(self, camera) -> None:
        """A browser's camera message: checked (`clamp_camera`), then stored
        unless its browser has left, it is older than the stored one, or it
        changes nothing."""
        client_id = camera.client.client_id
        try:
            stamp = camera.update_timestamp
            checked, problem = clamp_camera(camera.wxyz, camera.position, camera.fov, camera.image_height,
                                            camera.image_width)
        except AssertionError:      # viser: the browser has not sent its camera yet
            return
        except ValueError as exc:
            log.warning("viewer: browser %s: camera refused: %s", client_id, exc)
            return
        if problem:
            log.warning("viewer: browser %s: camera: %s", client_id, problem)
        pose, fov, height, width = checked
        with self.lock:
            if client_id not in self.clients:
                return
            old = self.cameras.get(client_id)
            if old is not None and (stamp < old.stamp or (np.array_equal(pose, old.pose) and
                                                          (fov, height, width) == (old.fov, old.height, old.width))):
                return
            version = old.version + 1 if old is not None else 1
            self.cameras[client_id] = BrowserCamera(pose, fov, height, width, version, time.perf_counter(), stamp)

    def _state(self, client_id: int) -> BrowserState:
        """The browser's settings (the defaults for a browser that has left)."""
        return self.clients.get(client_id) or BrowserState(max_resolution=self.default_resolution)

    # --- keyframes ---

    def _add_keyframe(self, client_id: int) -> None:
        with self.lock:
            camera, state = self.cameras.get(client_id), self.clients.get(client_id)
        if camera is not None and state is not None:
            state.keyframes.append((camera.pose, math.degrees(camera.fov)))
            state.keyframe_count.content = f"{len(state.keyframes)} keyframes"

    def _clear_keyframes(self, client_id: int) -> None:
        state = self.clients.get(client_id)
        if state is not None:
            state.keyframes = []
            state.keyframe_count.content = "0 keyframes"

    def _save_camera_path(self, client_id: int) -> None:
        state = self.clients.get(client_id)
        if state is None:
            return
        if not state.keyframes:
            state.keyframe_count.content = "add a keyframe first"
            return
        try:
            path = self.save_camera_path(state.keyframes, state.seconds, state.fps)
        except WriteError as err:
            state.keyframe_count.content = f"not saved: {err}"
            return
        state.keyframe_count.content = f"{len(state.keyframes)} keyframes, saved to {path}"

    def save_camera_path(self, keyframes: List[tuple], seconds: float, fps: float) -> Path:
        """Writes expdir/camera_path.json (an earlier one kept as .earlier) for
        keyframes [(pose (4, 4), vertical fov in degrees), ...]: `seconds` x `fps`
        frames at the training images' size; forward-facing scenes keep the
        training camera's field of view (their NDC needs it)."""
        n_frames = max(1, round(seconds * fps))
        poses = camera_path.interpolate_poses([pose for pose, _ in keyframes], n_frames)
        key_fovs = [fov for _, fov in keyframes]
        fovs = np.interp(np.linspace(0, len(key_fovs) - 1, n_frames), np.arange(len(key_fovs)), key_fovs)
        if self.ndc:
            fovs = np.full(n_frames, math.degrees(self.fov))
        content = camera_path.camera_path_json(poses, fovs, self.scene.H, self.scene.W, fps, keyframes=[
            {"matrix": camera_path.as_pose(pose).reshape(-1).tolist(), "fov": fov} for pose, fov in keyframes])
        path = run_folder.keep_earlier(outputs.make_folder(self.expdir) / "camera_path.json")
        camera_path.save_camera_path(path, content)
        log.info("viewer: saved %s", path)
        return path

    # --- rendering ---

    def _rays(self, camera: BrowserCamera, h: int, w: int):
        return browser_rays(camera.pose, camera.fov, h, w, self.device)

    def _render_rays(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple:
        return render_world_rays(self.scene, self.render_kwargs, rays_o, rays_d)

    def _measure_speed(self) -> None:
        """Rays a second, from one small render (which also warms the networks up)."""
        camera = BrowserCamera(np.eye(4), self.fov, 16, 16, 0, 0.0)
        camera.pose[:3, :4] = self.scene.poses[self.scene.i_train[0]]
        rays = self._rays(camera, 16, 16)
        self._render_rays(*rays)
        start = time.perf_counter()
        self._render_rays(*rays)
        self.rays_per_second = 256 / max(time.perf_counter() - start, 1e-6)

    def _full_size(self, client_id: int, camera: BrowserCamera) -> tuple:
        """(h, w) of the camera's canvas, its longer side capped by its browser's resolution slider."""
        cap = float(self._state(client_id).max_resolution)
        scale = min(1.0, cap / max(camera.height, camera.width))
        return picture_size(camera.height, camera.width, camera.height * camera.width * scale ** 2)

    def _next_picture(self, max_pixels: float = math.inf, redraw: bool = False) -> Optional[Picture]:
        """The next picture to render, for the client whose picture is oldest: a
        preview for a camera that moved, `REFINE` times the pixels of the picture
        on screen for one that has rested, at most `max_pixels` and the capped
        canvas; redraw: a picture as sharp as it gets is drawn again (the
        networks changed). None when every browser is up to date."""
        now = time.perf_counter()
        with self.lock:
            cameras, shown = dict(self.cameras), dict(self.shown)
        preview_pixels = self.rays_per_second * PREVIEW_SECONDS
        for client_id, camera in sorted(cameras.items(), key=lambda item: shown[item[0]].at if item[0] in shown
                                        else -math.inf):
            if camera.height <= 0 or camera.width <= 0:
                continue
            on_screen = shown.get(client_id)
            moved = on_screen is None or on_screen.version != camera.version
            if not moved and now - camera.changed_at < REST_SECONDS:
                continue    # the camera may move on: its preview stays
            pixels = preview_pixels if moved else max(preview_pixels, REFINE * on_screen.h * on_screen.w)
            full_h, full_w = self._full_size(client_id, camera)
            h, w = picture_size(full_h, full_w, min(pixels, max_pixels))
            if moved or redraw or h * w > on_screen.h * on_screen.w:
                return Picture(client_id, camera, h, w, full_h, full_w, moved)
        return None

    def _start(self, picture: Picture) -> RenderJob:
        full = (picture.h, picture.w) == (picture.full_h, picture.full_w)
        return RenderJob(picture.client_id, picture.camera.version, full, picture.h, picture.w,
                         *self._rays(picture.camera, picture.h, picture.w), picture.preview,
                         (picture.full_h, picture.full_w))

    def _current_job(self) -> Optional[RenderJob]:
        """The job under way, unless its browser left or (for a sharper picture)
        its camera moved on; else the next one, or None."""
        job = self.job
        if job is not None:
            with self.lock:
                camera = self.cameras.get(job.client_id)
            if camera is None or (not job.preview and camera.version != job.version):
                job = None
        if job is None:
            picture = self._next_picture()
            job = self._start(picture) if picture is not None else None
        self.job = job
        return job

    def _render_slice(self, job: RenderJob) -> bool:
        """Renders the job's next slice of rays (about `SLICE_SECONDS` of them),
        updating the measured speed; returns whether the job is complete."""
        n = max(64, int(self.rays_per_second * SLICE_SECONDS))
        start = time.perf_counter()
        part = slice(job.done, job.done + n)
        for name, value in zip(("rgb", "disp", "acc"), self._render_rays(job.rays_o[part], job.rays_d[part])):
            job.maps[name].append(value)
        rays = min(n, len(job.rays_o) - job.done)
        job.done += rays
        elapsed = time.perf_counter() - start
        self.rays_per_second = 0.7 * self.rays_per_second + 0.3 * rays / max(elapsed, 1e-6)
        return job.done >= len(job.rays_o)

    def work(self, seconds: float) -> bool:
        """Renders for about `seconds` (at least one slice when there is work),
        a picture possibly over several calls (view.py: the networks never
        change); returns whether there was anything to render."""
        deadline = time.perf_counter() + seconds
        busy = False
        while True:
            job = self._current_job()
            if job is None:
                return busy
            busy = True
            if self._render_slice(job):
                self._show(job)
                self.job = None
            else:
                self._report_progress(job)
            if time.perf_counter() >= deadline:
                return busy

    def _render_whole(self, picture: Picture) -> None:
        """Renders the picture and shows it, all in this call: one set of weights."""
        job = self._start(picture)
        while not self._render_slice(job):
            pass
        self._show(job)

    def picture(self, job: RenderJob) -> np.ndarray:
        """The finished job's picture (h, w, 3) uint8 for the chosen output."""
        maps = {name: torch.cat(values).reshape(job.h, job.w, -1).squeeze(-1).cpu().numpy()
                for name, values in job.maps.items()}
        kind = self._state(job.client_id).output
        if kind == "depth":
            disp = maps["disp"]
            depth = np.where((maps["acc"] > 0.5) & (disp > 0), 1.0 / np.maximum(disp, 1e-10), np.nan)
            image = geometry.colour_depth(depth)
        elif kind == "accumulation":
            image = np.repeat(maps["acc"][..., None], 3, -1)
        else:
            image = maps["rgb"]
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    def _send(self, job: RenderJob) -> bool:
        """Sends the finished job's picture to its browser; whether it is still there to receive it."""
        client = self.server.get_clients().get(job.client_id)
        if client is None:
            return False
        try:
            client.scene.set_background_image(self.picture(job), format="jpeg", jpeg_quality=90)
        except Exception as exc:   # a browser that left mid-render costs nothing
            log.debug("viewer: client %s: %s", job.client_id, exc)
            return False
        return True

    def _show(self, job: RenderJob) -> None:
        if not self._send(job):
            return
        now = time.perf_counter()
        with self.lock:
            self.shown[job.client_id] = Shown(job.version, job.h, job.w, job.full, now)
            state = self.clients.get(job.client_id)
        if state is not None and state.progress is not None:
            state.progress.content = progress_text((job.h, job.w), job.canvas, training=self.training)
            state.progress_at = now

    def _report_progress(self, job: RenderJob) -> None:
        """The job's browser's progress line for a sharper picture under way (at
        most every `PROGRESS_SECONDS`)."""
        now = time.perf_counter()
        with self.lock:
            on_screen, state = self.shown.get(job.client_id), self.clients.get(job.client_id)
        if (job.preview or on_screen is None or state is None or state.progress is None
                or now - state.progress_at < PROGRESS_SECONDS):
            return
        state.progress.content = progress_text((on_screen.h, on_screen.w), job.canvas,
                                               (job.h, job.w, job.done / len(job.rays_o)))
        state.progress_at = now

    def _drop_failed_pictures(self, exc: Exception) -> None:
        """After a failed render: one line, and the pictures on screen count as
        up to date until a camera moves (or training refreshes them)."""
        log.warning("viewer: a picture failed (%s: %s); the viewer goes on", type(exc).__name__, exc)
        self.job = None
        now = time.perf_counter()
        with self.lock:
            cameras = dict(self.cameras)
        shown = {client_id: Shown(camera.version, *self._full_size(client_id, camera), True, now)
                 for client_id, camera in cameras.items()}
        with self.lock:
            self.shown.update(shown)

    def serve_forever(self) -> None:
        """Renders for the browsers until `stop` (or Ctrl-C: view.py)."""
        while not self.stopped.is_set():
            try:
                busy = self.work(0.05)
            except Exception as exc:
                self._drop_failed_pictures(exc)
                busy = False
            if not busy:
                time.sleep(0.01)

    # --- training ---

    def training_step(self, step: int, stats: dict) -> None:
        """Called after each training step: shows the step's numbers (at most
        twice a second, and only to a browser) and renders for the share of
        time the sliders leave to the viewer (`training_share`), counting as
        training time what passed since the previous call. Never raises: a
        failed picture is a warning and training goes on."""
        now = time.perf_counter()
        step_seconds, self.last_call = now - (self.last_call or now), now
        if not self.cameras:
            return
        try:
            if now - self.last_stats_at > 0.5:
                self.last_stats_at = now
                numbers = (f"**Step** {step}  \n**Loss** {float(stats['loss']):.5f}  \n"
                           f"**PSNR** {float(stats['psnr']):.2f}")
                with self.lock:
                    states = list(self.clients.values())
                for state in states:
                    if state.stats is not None:
                        state.stats.content = numbers
            self._render_for_training(step_seconds)
        except Exception as exc:
            self._drop_failed_pictures(exc)
        self.last_call = time.perf_counter()     # rendering is not training time

    def training_share(self) -> float:
        """The fraction of time left to training: the largest share any
        connected browser asks for (its "Training share" slider), the default
        with none. Every browser is untrusted and the viewer's time is shared by
        all of them, so no browser can take training time that another has not
        also given: rendering gets more than the default's 10% only when every
        connected browser asks for it, and any browser may give training more."""
        with self.lock:
            return max((state.training_share for state in self.clients.values()), default=DEFAULT_TRAINING_SHARE)

    def _render_for_training(self, step_seconds: float) -> None:
        """Renders one whole picture when the share has paid for it: `step_seconds`
        of training earn (1 - share) / share seconds of rendering each, saved up
        to what one picture may take, `PICTURE_SHARE` of a refresh period's
        rendering time; pictures are sized to fit that, so a picture at rest is
        redrawn about every PICTURE_SHARE x REFRESH_SECONDS. A picture that took
        far longer than its size promised (on a loaded machine the process was
        not running) is forgiven beyond one picture's time: it delays the next
        by at most about one refresh period. A share of 1 leaves the viewer no
        time: nothing is rendered."""
        share = self.training_share()
        if share >= 1.0:
            self.render_credit = 0.0
            return
        most = PICTURE_SHARE * REFRESH_SECONDS * (1.0 - share)
        self.render_credit = min(self.render_credit + step_seconds * (1.0 - share) / share, most)
        picture = self._next_picture(max_pixels=most * self.rays_per_second, redraw=True)
        affordable = picture is not None and (picture.h * picture.w <= self.render_credit * self.rays_per_second
                                              or self.render_credit >= most)    # saved up all it may
        if not affordable:
            return
        start = time.perf_counter()
        self._render_whole(picture)
        self.render_credit = max(self.render_credit - (time.perf_counter() - start), -most)

    def stop(self) -> None:
        """Stops rendering and the server."""
        self.stopped.set()
        self._stop_server()

    def _stop_server(self) -> None:
        with quiet_stdout():
            self.server.stop()


def check_flag(args) -> None:
    """--viewer: viser installed and --viewer_host:--viewer_port free (checked before any work)."""
    if not getattr(args, "viewer", False) or args.render_only:    # render-only runs serve nothing
        return
    if importlib.util.find_spec("viser") is None:
        raise DataError("--viewer", "needs viser: pip install -r requirements-viewer.txt")
    check_port(args.viewer_host, args.viewer_port, "--viewer_port")


def training_viewer(args, scene, render_kwargs: dict, device: torch.device, expdir: Path) -> Optional[Viewer]:
    """The viewer `run_nerf.py --viewer` trains with (on --viewer_host:--viewer_port), or None without --viewer."""
    if not getattr(args, "viewer", False):
        return None
    check_flag(args)
    viewer = Viewer(scene, render_kwargs, device, expdir, args.viewer_host, args.viewer_port, training=True,
                    port_flag="--viewer_port")
    log.info("viewer: http://%s:%d", args.viewer_host, args.viewer_port)
    return viewer
