"""The live web viewer: a NeRF rendered from each browser's camera, served with viser.

`Viewer` starts a viser server showing the training cameras (frustums with their
images: a click moves the view there) and renders the scene from every connected
browser's camera, refining progressively: a moving camera gets a preview (sized
from the measured rendering speed so that it takes about `PREVIEW_SECONDS`);
once the camera has rested for `REST_SECONDS`, each picture has `REFINE` times
the pixels of the one before, up to the full canvas (capped by the resolution
slider). The panel says which resolution is on screen and how far the next
one has come.

All rendering happens in the thread that calls `work(seconds)` or
`training_step`. view.py calls `work` in a loop: a picture proceeds in slices of
rays between checks of the clock, and a refinement is dropped as soon as the
camera moves again. Training calls `training_step` after each step, which
renders for a share of the time (the slider "training share" is the fraction
of time left to training). There every picture is rendered whole within one
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
from typing import Dict, List, NamedTuple, Optional

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


def progress_text(shown: tuple, canvas: tuple, refining: Optional[tuple] = None, training: bool = False) -> str:
    """The panel's line on the picture: the size (h, w) on screen out of the
    capped canvas (h, w); refining (h, w, fraction done) for a sharper picture
    under way; training: a picture short of the canvas is what the share allows."""
    text = f"**Picture** {shown[1]} x {shown[0]} of {canvas[1]} x {canvas[0]}"
    if refining is not None:
        text += f"; refining: {refining[1]} x {refining[0]}, {100 * refining[2]:.0f}%"
    elif training and tuple(shown) != tuple(canvas):
        text += " (more: a lower training share)"
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
    canvas size, and a version counting its changes."""
    pose: np.ndarray
    fov: float
    height: int
    width: int
    version: int
    changed_at: float


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
        self.lock = threading.Lock()
        self.cameras: Dict[int, BrowserCamera] = {}
        self.shown: Dict[int, Shown] = {}        # client id -> the picture on its screen
        self.job: Optional[RenderJob] = None
        self.rays_per_second = 0.0
        self.keyframes: List[tuple] = []
        self.render_credit = 0.0                 # training: seconds of rendering the share has paid for
        self.last_stats_at = self.last_progress_at = 0.0
        self.failed = False
        self.last_call: Optional[float] = None
        self.stopped = threading.Event()

        with quiet_stdout():
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        if self.server.get_port() != port:     # taken between the check and the start
            self._stop_server()
            raise DataError(port_flag, f"port {port} on {host} is in use; pick another port")
        self._set_up_scene()
        self._set_up_panel(training)
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)
        self._measure_speed()

    # --- scene and panel ---

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

    def _set_up_panel(self, training: bool) -> None:
        gui = self.server.gui
        self.output = gui.add_dropdown("Output", OUTPUTS, initial_value="RGB")
        longest = max(self.scene.H, self.scene.W)
        self.max_resolution = gui.add_slider("Max resolution", min=32, max=max(2048, longest), step=16,
                                             initial_value=max(256, longest))
        for handle in (self.output, self.max_resolution):
            handle.on_update(lambda _: self._redraw_all())
        self.show_cameras = gui.add_checkbox("Training cameras", initial_value=True)
        self.show_cameras.on_update(lambda _: self._show_frustums(self.show_cameras.value))
        self.progress = gui.add_markdown("**Picture** waiting for a camera")
        self.training_share = None
        if training:
            self.stats = gui.add_markdown("Training: starting")
            self.training_share = gui.add_slider("Training share", min=0.1, max=1.0, step=0.05,
                                                 initial_value=DEFAULT_TRAINING_SHARE)
        with gui.add_folder("Camera path"):
            self.seconds = gui.add_number("Seconds", initial_value=4.0, min=0.1, step=0.1)
            self.fps = gui.add_number("FPS", initial_value=24, min=1, step=1)
            self.keyframe_count = gui.add_markdown("0 keyframes")
            gui.add_button("Add keyframe").on_click(lambda event: self._add_keyframe(event.client))
            gui.add_button("Clear keyframes").on_click(lambda _: self._clear_keyframes())
            gui.add_button("Save camera_path.json").on_click(lambda _: self._save_camera_path())

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

    # --- browsers ---

    def _connect(self, client) -> None:
        client.camera.on_update(self._camera_moved)

    def _disconnect(self, client) -> None:
        with self.lock:
            self.cameras.pop(client.client_id, None)
            self.shown.pop(client.client_id, None)

    def _camera_moved(self, camera) -> None:
        client_id = camera.client.client_id
        pose = browser_pose(camera.wxyz, camera.position)
        with self.lock:
            version = self.cameras[client_id].version + 1 if client_id in self.cameras else 1
            self.cameras[client_id] = BrowserCamera(pose, float(camera.fov), int(camera.image_height),
                                                    int(camera.image_width), version, time.perf_counter())

    def _redraw_all(self) -> None:
        with self.lock:
            self.shown.clear()

    # --- keyframes ---

    def _add_keyframe(self, client) -> None:
        if client is None:
            return
        with self.lock:
            camera = self.cameras.get(client.client_id)
        if camera is not None:
            self.keyframes.append((camera.pose, math.degrees(camera.fov)))
            self.keyframe_count.content = f"{len(self.keyframes)} keyframes"

    def _clear_keyframes(self) -> None:
        self.keyframes = []
        self.keyframe_count.content = "0 keyframes"

    def _save_camera_path(self) -> None:
        if not self.keyframes:
            self.keyframe_count.content = "add a keyframe first"
            return
        try:
            self.save_camera_path(self.keyframes, float(self.seconds.value), float(self.fps.value))
        except WriteError as err:
            self.keyframe_count.content = f"not saved: {err}"

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
        self.keyframe_count.content = f"{len(keyframes)} keyframes, saved to {path}"
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

    def _full_size(self, camera: BrowserCamera) -> tuple:
        """(h, w) of the camera's canvas, its longer side capped by the resolution slider."""
        cap = float(self.max_resolution.value)
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
            full_h, full_w = self._full_size(camera)
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
        kind = self.output.value
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
        with self.lock:
            self.shown[job.client_id] = Shown(job.version, job.h, job.w, job.full, time.perf_counter())
        self.progress.content = progress_text((job.h, job.w), job.canvas, training=self.training_share is not None)
        self.last_progress_at = time.perf_counter()

    def _report_progress(self, job: RenderJob) -> None:
        """The panel's progress line for a sharper picture under way (at most every `PROGRESS_SECONDS`)."""
        now = time.perf_counter()
        if job.preview or now - self.last_progress_at < PROGRESS_SECONDS:
            return
        with self.lock:
            on_screen = self.shown.get(job.client_id)
        if on_screen is not None:
            self.progress.content = progress_text((on_screen.h, on_screen.w), job.canvas,
                                                  (job.h, job.w, job.done / len(job.rays_o)))
            self.last_progress_at = now

    def serve_forever(self) -> None:
        """Renders for the browsers until `stop` (or Ctrl-C: view.py)."""
        while not self.stopped.is_set():
            if not self.work(0.05):
                time.sleep(0.01)

    # --- training ---

    def training_step(self, step: int, stats: dict) -> None:
        """Called after each training step: shows the step's numbers (at most
        twice a second, and only to a browser) and renders for the share of
        time the slider leaves to the viewer, counting as training time what
        passed since the previous call. Never raises: a failing viewer is
        switched off with a warning and training goes on."""
        now = time.perf_counter()
        step_seconds, self.last_call = now - (self.last_call or now), now
        if self.failed or not self.cameras:
            return
        try:
            if now - self.last_stats_at > 0.5:
                self.last_stats_at = now
                self.stats.content = (f"**Step** {step}  \n**Loss** {float(stats['loss']):.5f}  \n"
                                      f"**PSNR** {float(stats['psnr']):.2f}")
            self._render_for_training(step_seconds)
        except Exception as exc:
            self.failed = True
            log.warning("warning: the viewer stopped (%s: %s); training goes on", type(exc).__name__, exc)
        self.last_call = time.perf_counter()     # rendering is not training time

    def _render_for_training(self, step_seconds: float) -> None:
        """Renders one whole picture when the share has paid for it: `step_seconds`
        of training earn (1 - share) / share seconds of rendering each, saved up
        to what one picture may take, `PICTURE_SHARE` of a refresh period's
        rendering time; pictures are sized to fit that, so a picture at rest is
        redrawn about every PICTURE_SHARE x REFRESH_SECONDS. A picture that took
        far longer than its size promised (on a loaded machine the process was
        not running) is forgiven beyond one picture's time: it delays the next
        by at most about one refresh period."""
        share = float(self.training_share.value)
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
