"""Own captures: general intrinsics K in rays and NDC, transforms.json (--dataset_type nerfstudio), undistortion.

Independent references: float64 re-derivations of the NDC map from its
definition (image edges to +-1), an analytic plane for depth maps, the Blender
loader for lego written as a transforms.json, and an analytic image seen
through a distorted camera for undistortion.
"""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import run_nerf
from nerf import data_checks, geometry
from nerf.datasets import load_scene
from nerf.errors import DataError
from nerf.load_transforms import camera_bounds, load_transforms_data, read_capture
from nerf.sparse_points import write_ply_points
from nerf.ray_batches import rays_at
from nerf.undistort import Camera, distort, pinhole_for, source_pixels, undistort_image, undistorted_files
from load_blender import pose_spherical
from run_nerf_helpers import get_rays, ndc_rays
from scripts.measure_captures import blender_as_transforms, llff_as_transforms

def intrinsics(fx, fy, cx, cy) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def random_pose(rng, dtype=torch.float64) -> torch.Tensor:
    """A camera-to-world (3, 4) looking roughly down -z from near the origin (forward-facing)."""
    a = rng.normal(size=3) * 0.2
    R = torch.linalg.matrix_exp(torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]]))
    return torch.cat([R, torch.tensor(rng.normal(size=(3, 1)) * 0.3)], 1).to(dtype)


# --- NDC with a general K -----------------------------------------------------------

def test_ndc_with_a_centred_K_is_the_originals_bit_for_bit():
    rng = np.random.default_rng(0)
    for H, W, focal in ((378, 504, 407.56), (37, 51, 40.0), (800, 800, 1111.1)):
        c2w = random_pose(rng, torch.float32)
        rays_o, rays_d = get_rays(H, W, intrinsics(focal, focal, 0.5 * W, 0.5 * H), c2w)
        for a, b in zip(ndc_rays(H, W, focal, 1.0, rays_o, rays_d),
                        ndc_rays(H, W, intrinsics(focal, focal, 0.5 * W, 0.5 * H), 1.0, rays_o, rays_d)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("offset", [(0, 0), (50, -50), (-37.5, 20), (120, 90)])
@pytest.mark.parametrize("fy_over_fx", [1.0, 1.07])
def test_ndc_of_a_general_K_maps_the_image_to_the_unit_square(offset, fy_over_fx):
    """From the definition, in float64: pixel (i, j) of a camera at the origin looking down -z starts at
    NDC (2 i/W - 1, 1 - 2 j/H, -1); every point o + t d of a pixel ray maps (world_to_ndc) onto the NDC ray
    o' + s d'; ndc_to_world inverts world_to_ndc."""
    H, W, fx = 60, 80, 70.0
    K = intrinsics(fx, fx * fy_over_fx, W / 2 + offset[0], H / 2 + offset[1])
    eye = torch.eye(4, dtype=torch.float64)[:3]
    rays_o, rays_d = get_rays(H, W, K, eye)
    o, d = ndc_rays(H, W, K, 1.0, rays_o, rays_d)
    j, i = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    expected = torch.stack([2 * i / W - 1, 1 - 2 * j / H, -torch.ones_like(i)], -1)
    assert torch.allclose(o, expected, atol=1e-12, rtol=0)
    rng = np.random.default_rng(1)
    c2w = random_pose(rng)
    rays_o, rays_d = get_rays(H, W, K, c2w)
    o, d = ndc_rays(H, W, K, 1.0, rays_o, rays_d)
    for t in (1.5, 3.0, 20.0):
        p = rays_o + t * rays_d
        keep = p[..., 2] < -1.0                         # in front of the NDC near plane
        q = geometry.world_to_ndc(p, H, W, K)
        s = (q[..., 2] - o[..., 2]) / d[..., 2]
        assert torch.allclose((o + s[..., None] * d)[keep], q[keep], atol=1e-9, rtol=0)
        assert torch.allclose(geometry.ndc_to_world(q, H, W, K)[keep], p[keep], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("offset", [(0, 0), (50, -50), (-30, 45)])
def test_depth_map_in_ndc_with_an_off_centre_K(offset):
    """A plane z = -D seen from the origin: NDC rays start at z' = -1 with d'_z = 2, reach the plane's
    z' = 1 - 2/D at s = 1 - 1/D; given disp = 1/s, depth_map must give D at every pixel."""
    H, W = 30, 40
    K = intrinsics(35.0, 38.0, W / 2 + offset[0], H / 2 + offset[1])
    eye = torch.eye(4, dtype=torch.float64)[:3]
    for D in (1.5, 4.0, 30.0):
        disp = torch.full((H, W), 1.0 / (1.0 - 1.0 / D), dtype=torch.float64)
        depth = geometry.depth_map(disp, torch.ones_like(disp), eye, K, ndc=True)
        assert torch.allclose(depth, torch.full_like(depth, D), rtol=1e-10)


@pytest.mark.parametrize("crop", [(0, 100), (50, 0), (25, 75)])
def test_cropped_camera_rays_are_the_uncropped_cameras_rays(crop):
    """Cropping rows [r0, r0 + h), columns [c0, c0 + w) moves the principal point by (c0, r0): every ray of
    the cropped camera is exactly the ray of the pixel it came from (get_rays and the training batches);
    ignoring the principal point would turn each by the crop's offset angle."""
    r0, c0 = crop
    H, W, h, w = 400, 400, 300, 300
    K = intrinsics(555.555, 555.555, 200.0, 200.0)
    K_crop = intrinsics(555.555, 555.555, 200.0 - c0, 200.0 - r0)
    c2w = torch.tensor(pose_spherical(30.0, -30.0, 4.0)[:3, :4], dtype=torch.float32)
    full_o, full_d = get_rays(H, W, K, c2w)
    crop_o, crop_d = get_rays(h, w, K_crop, c2w)
    assert torch.equal(crop_d, full_d[r0:r0 + h, c0:c0 + w]) and torch.equal(crop_o, full_o[r0:r0 + h, c0:c0 + w])
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    _, batch_d = rays_at(K_crop, c2w, rows, cols)
    assert torch.equal(batch_d, crop_d.reshape(-1, 3))
    _, centred_d = get_rays(h, w, intrinsics(555.555, 555.555, w / 2, h / 2), c2w)
    cos = torch.nn.functional.cosine_similarity(centred_d.double(), crop_d.double(), dim=-1)
    shift = math.hypot(200.0 - c0 - w / 2, 200.0 - r0 - h / 2) / 555.555     # principal point moved, in radians
    assert shift > 0.05 and float(torch.acos(cos.clamp(max=1)).min()) > 0.5 * shift


def test_renders_and_depth_maps_of_a_cropped_camera_are_the_crop_of_the_full_ones(tmp_path):
    """A random tiny NeRF rendered (render_path: colours, disparities, depth maps) from a camera whose K has its
    principal point moved by a crop gives the crop of the full camera's render (world-space scenes; in NDC a
    scene's map is fixed by its training K, see the plane test above)."""
    torch.manual_seed(0)
    H, W, r0, c0, h, w = 24, 32, 4, 10, 16, 16
    args = run_nerf.config_parser().parse_args(
        ["--netdepth", "2", "--netwidth", "16", "--N_samples", "8", "--multires", "3", "--use_viewdirs",
         "--basedir", str(tmp_path), "--expname", "r", "--no_reload", "--dataset_type", "nerfstudio"])
    _, kwargs, _, _, _ = run_nerf.create_nerf(args, torch.device("cpu"))
    kwargs.update(near=2.0, far=6.0)
    c2w = torch.tensor(pose_spherical(20.0, -10.0, 4.0)[None, :3, :4])
    full = run_nerf.render_path(c2w, (H, W, 30.0), intrinsics(30.0, 31.0, W / 2, H / 2), 4096, kwargs,
                                progress=False, with_depth=True)
    crop = run_nerf.render_path(c2w, (h, w, 30.0), intrinsics(30.0, 31.0, W / 2 - c0, H / 2 - r0), 4096, kwargs,
                                progress=False, with_depth=True)
    for a, b in zip(full, crop):
        assert np.isfinite(b).any()
        assert np.allclose(a[:, r0:r0 + h, c0:c0 + w], b, atol=1e-5, equal_nan=True)
    assert not np.allclose(full[0][:, :h, :w], crop[0], atol=1e-3)       # the corner crop differs


# --- transforms.json -------------------------------------------------------------

def scene_args(datadir, **kw) -> SimpleNamespace:
    args = run_nerf.config_parser().parse_args(["--datadir", str(datadir)])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
def test_lego_as_a_transforms_json_loads_the_blender_loaders_arrays(lego_dir, tmp_path):
    """Same images, poses, K, splits and bounds, bit for bit: training is then the same run."""
    blender = load_scene(scene_args(lego_dir, dataset_type="blender", half_res=True, testskip=40, white_bkgd=True))
    ours_dir = blender_as_transforms(lego_dir, tmp_path / "lego")
    args = scene_args(ours_dir, dataset_type="nerfstudio", factor=2, testskip=1, white_bkgd=True)
    assert data_checks.check_data(args) == (400, 400)
    ours = load_scene(args)
    assert ours.images.dtype == blender.images.dtype == np.float32
    assert np.array_equal(np.asarray(ours.images).view(np.uint32), np.asarray(blender.images).view(np.uint32))
    assert np.array_equal(ours.poses, blender.poses) and np.array_equal(ours.K, blender.K)
    assert (ours.H, ours.W, ours.focal, ours.near, ours.far) == (blender.H, blender.W, blender.focal, 2.0, 6.0)
    for a, b in ((ours.i_train, blender.i_train), (ours.i_val, blender.i_val), (ours.i_test, blender.i_test)):
        assert np.array_equal(a, b)


def test_bounds_from_the_cameras(lego_dir, tmp_path):
    """Without near/far in the file: lego's cameras all look at the origin from |o| ~ 4.03, so the centre is
    there and near, far = min |o| / 2, 3 max |o| / 2 (the Blender loader's 2 and 6, near enough)."""
    capture = read_capture(blender_as_transforms(lego_dir, tmp_path / "lego", bounds=False))
    near, far, centre = camera_bounds(capture.poses)
    dist = np.linalg.norm(capture.poses[:, :3, 3], axis=-1)
    assert np.linalg.norm(centre) < 0.05 * dist.mean()
    assert abs(near - 0.5 * dist.min()) < 0.03 and abs(far - 1.5 * dist.max()) < 0.1
    assert 1.9 < near < 2.1 and 5.8 < far < 6.3


def tiny_capture(root: Path, n: int = 6, size=(24, 16), meta_extra=None, frame_extra=None, ext=".png") -> Path:
    """n random RGB photos on a circle, shared intrinsics, no splits."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    frames = []
    for k in range(n):
        iio.imwrite(root / "images" / f"f{k}{ext}", rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        frame = {"file_path": f"images/f{k}{ext}", "transform_matrix": pose_spherical(60.0 * k, -20.0, 3.0).tolist()}
        frame.update((frame_extra or {}).get(k, {}))
        frames.append(frame)
    meta = {"fl_x": 20.0, "fl_y": 21.0, "cx": 11.0, "cy": 9.5, "w": size[0], "h": size[1], "frames": frames}
    meta.update(meta_extra or {})
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def test_llffhold_split_images_N_folder_and_K(tmp_path):
    root = tiny_capture(tmp_path / "cap", n=9)
    scene = load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=4))
    assert np.array_equal(scene.i_test, [0, 4, 8]) and np.array_equal(scene.i_train, [1, 2, 3, 5, 6, 7])
    assert np.array_equal(scene.K, intrinsics(20.0, 21.0, 10.5, 9.0))       # the file's cx, cy put centres at +0.5
    assert np.array_equal(np.asarray(scene.images[1]), iio.imread(root / "images" / "f1.png") / np.float32(255.0))
    poses = read_capture(root).poses               # no near, far: from the cameras, then centred, far scaled to 6
    near, far, centre = camera_bounds(poses)
    assert scene.far == pytest.approx(6.0, rel=1e-12) and scene.near == pytest.approx(6.0 * near / far, rel=1e-12)
    assert np.allclose(scene.poses[:, :3, 3], (poses[:, :3, 3] - centre) * (6.0 / far), rtol=1e-6, atol=1e-6)
    assert np.array_equal(scene.poses[:, :3, :3], poses[:, :3, :3])
    (root / "images_2").mkdir()
    for k in range(9):
        iio.imwrite(root / "images_2" / f"f{k}.png", np.full((8, 12, 3), 10 * k, np.uint8))
    args = scene_args(root, dataset_type="nerfstudio", factor=2, llffhold=4)
    assert data_checks.check_data(args) == (8, 12)
    scene = load_scene(args)
    assert (scene.H, scene.W) == (8, 12) and np.array_equal(scene.K, intrinsics(10.0, 10.5, 5.0, 4.25))
    assert np.allclose(np.asarray(scene.images)[:, 0, 0, 0], np.arange(9) * 10 / 255.0)


@pytest.mark.parametrize("case, fragment", [
    ("missing_image", "f2.png: missing (frame 2 of"),
    ("no_matrix", "frame 3: (images/f3.png) has no 'transform_matrix'"),
    ("nan_matrix", "frame 1: (images/f1.png) 'transform_matrix' holds NaN or inf"),
    ("other_size", "f4.png: is 10x10, frame 0's image is 24x16"),
    ("wrong_wh", "f0.png: is 24x16 but"),
    ("per_frame_K", "frame 5: camera differs from frame 0's"),
    ("model", "camera_model 'EQUIRECTANGULAR' cannot be undistorted here"),
    ("fisheye624", "camera_model 'FISHEYE624' cannot be undistorted here"),
    ("k5", "lens term 'k5' = 0.01 cannot be undistorted here"),
    ("k6", "lens term 'k6' = 0.01 cannot be undistorted here"),
    ("s1", "lens term 's1' = 0.01 cannot be undistorted here"),
    ("s2", "lens term 's2' = 0.01 cannot be undistorted here"),
    ("s3", "lens term 's3' = 0.01 cannot be undistorted here"),
    ("s4", "lens term 's4' = 0.01 cannot be undistorted here"),
    ("ftheta", "f-theta lens ('ftheta_p0') cannot be undistorted here"),
    ("fisheye_and_opencv", "'is_fisheye' is true but camera_model is 'OPENCV'"),
    ("fisheye_not_bool", "'is_fisheye' is 'yes', expected true or false"),
    ("fisheye_p1", "OPENCV_FISHEYE has no tangential terms p1, p2"),
    ("ply_missing", "nope.ply: cannot read the sparse points"),
    ("ply_not_ply", "pts.ply: not a PLY file"),
    ("ply_short", "pts.ply: PLY body does not hold the 5 vertices its header announces"),
    ("ply_no_xyz", "pts.ply: PLY vertices have no x, y, z"),
    ("bad_json", "not valid JSON"),
    ("split_name", "'test_filenames' names images/nope.png, which no frame has"),
])
def test_bad_transforms_json_is_one_line_exit_2_nothing_written(tmp_path, capsys, case, fragment):
    root = tiny_capture(tmp_path / "cap")
    meta = json.loads((root / "transforms.json").read_text())
    if case == "missing_image":
        (root / "images" / "f2.png").unlink()
    elif case == "no_matrix":
        del meta["frames"][3]["transform_matrix"]
    elif case == "nan_matrix":
        meta["frames"][1]["transform_matrix"][0][3] = float("nan")
    elif case == "other_size":
        iio.imwrite(root / "images" / "f4.png", np.zeros((10, 10, 3), np.uint8))
    elif case == "wrong_wh":
        meta["w"] = 30
    elif case == "per_frame_K":
        meta["frames"][5]["fl_x"] = 22.0
    elif case == "model":
        meta["camera_model"] = "EQUIRECTANGULAR"
    elif case == "fisheye624":
        meta.update(camera_model="FISHEYE624", k1=0.01, k5=0.0)
    elif case in ("k5", "k6", "s1", "s2", "s3", "s4"):
        meta.update(k1=0.01, **{case: 0.01})
    elif case == "ftheta":
        meta.update(ftheta_p0=0.0, ftheta_p1=1.0)
    elif case == "fisheye_and_opencv":
        meta.update(is_fisheye=True, camera_model="OPENCV", k1=0.01)
    elif case == "fisheye_not_bool":
        meta.update(is_fisheye="yes", k1=0.01)
    elif case == "fisheye_p1":
        meta.update(is_fisheye=True, k1=0.01, p1=0.001)
    elif case == "ply_missing":
        meta["ply_file_path"] = "nope.ply"
    elif case.startswith("ply_"):
        meta["ply_file_path"] = "pts.ply"
        header = "ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float {}\nproperty float y\n" \
                 "property float z\nend_header\n".format("w" if case == "ply_no_xyz" else "x")
        (root / "pts.ply").write_bytes(b"solid" if case == "ply_not_ply" else header.encode() + bytes(12 * 4))
    elif case == "split_name":
        meta.update(train_filenames=["images/f0.png"], test_filenames=["images/nope.png"])
    text = json.dumps(meta) if case != "bad_json" else "{frames: ["
    (root / "transforms.json").write_text(text)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    status = run_nerf.main(["--dataset_type", "nerfstudio", "--datadir", str(root), "--factor", "1",
                            "--basedir", str(tmp_path / "logs"), "--expname", "x", "--N_iters", "1"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- Distortion --------------------------------------------------------------------

def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth analytic picture on the normalised image plane, in [0, 255]."""
    return 127.5 + 100 * np.sin(7 * x + 2 * y) * np.cos(5 * y - x) + 20 * x


def undistort_points(xd: np.ndarray, yd: np.ndarray, camera: Camera) -> tuple:
    """The inverse of `distort` by Newton's method with a numeric Jacobian (float64, to 1e-13)."""
    x, y = xd.copy(), yd.copy()
    for _ in range(50):
        fx_, fy_ = distort(x, y, camera)
        e = 1e-7
        ax, ay = distort(x + e, y, camera)
        bx, by = distort(x, y + e, camera)
        j11, j21, j12, j22 = (ax - fx_) / e, (ay - fy_) / e, (bx - fx_) / e, (by - fy_) / e
        rx, ry = fx_ - xd, fy_ - yd
        det = j11 * j22 - j12 * j21
        x, y = x - (j22 * rx - j12 * ry) / det, y - (-j21 * rx + j11 * ry) / det
    return x, y


@pytest.mark.parametrize("pixel_centre", [0.0, 0.5])
@pytest.mark.parametrize("model, coefficients", [
    ("OPENCV", dict(k1=-0.12, k2=0.03, p1=0.002, p2=-0.001)),
    ("OPENCV", dict(k1=0.08, k2=0.01, k3=0.002)),
    ("OPENCV_FISHEYE", dict(k1=0.05, k2=-0.01, k3=0.003, k4=-0.001)),
])
def test_undistorted_photo_is_the_pinhole_picture(model, coefficients, pixel_centre):
    """Photograph the analytic `pattern` through a distorted camera (each photo pixel's pinhole coordinates by
    Newton inversion), undistort: the result is the pattern on the pinhole camera's pixels, up to bilinear
    interpolation's error (bounded by the pattern's curvature: second derivatives <= ~6000 px^-2 * 1/fx^2).
    Pixel (i, j) of both images is at (i + c, j + c), c = pixel_centre: 0.5 for the tools' cameras (the
    pattern is then seen half a pixel away from where c = 0 puts it, 100 x 0.5 / fx ~ 0.5 grey levels per
    pixel of gradient, far above the error bound)."""
    cam = Camera(120, 90, 100.0, 104.0, 62.0, 43.0, model, tuple(coefficients.items()), pixel_centre)
    j, i = np.mgrid[0:cam.h, 0:cam.w].astype(np.float64) + pixel_centre
    x, y = undistort_points((i - cam.cx) / cam.fx, (j - cam.cy) / cam.fy, cam)
    photo = pattern(x, y)[..., None]
    pinhole = pinhole_for(cam)
    u, v = source_pixels(cam, pinhole)
    assert u.min() >= 0 and u.max() <= cam.w - 1 and v.min() >= 0 and v.max() <= cam.h - 1
    out = undistort_image(photo, u, v)[..., 0]
    expected = pattern((i - pinhole.cx) / pinhole.fx, (j - pinhole.cy) / pinhole.fy)
    curvature = 100 * (8 ** 2 + 6 ** 2) / min(cam.fx, cam.fy) ** 2      # |second derivative| per px^2, bound
    assert np.abs(out - expected).max() < curvature / 4 + 1e-6
    u, v = source_pixels(cam, Camera(cam.w, cam.h, pinhole.fx * 0.99, pinhole.fy * 0.99, cam.cx, cam.cy,
                                     pixel_centre=pixel_centre))
    assert not ((u >= 0) & (u <= cam.w - 1) & (v >= 0) & (v <= cam.h - 1)).all()    # s is the smallest


def test_distorted_capture_is_undistorted_once_and_trains_on_the_pinhole_camera(tmp_path):
    extra = {"camera_model": "OPENCV", "k1": -0.1, "k2": 0.02, "p1": 0.001, "p2": 0.0}
    root = tiny_capture(tmp_path / "cap", size=(40, 30), meta_extra={"fl_x": 35.0, "fl_y": 35.0, "cx": 20.5,
                                                                        "cy": 14.0, "w": 40, "h": 30, **extra})
    scene = load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=3))
    capture = read_capture(root)
    pinhole = pinhole_for(capture.camera)
    assert np.array_equal(scene.K, pinhole.K) and pinhole.fx != 35.0
    u, v = source_pixels(capture.camera, pinhole)
    photo = iio.imread(capture.files[1])
    assert np.array_equal(np.asarray(scene.images[1]), undistort_image(photo, u, v) / np.float32(255.0))
    files, _ = undistorted_files(capture)
    stamp = [f.stat().st_mtime_ns for f in files]
    load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=3))
    assert [f.stat().st_mtime_ns for f in files] == stamp          # reused
    meta = json.loads((root / "transforms.json").read_text())
    meta["k1"] = -0.05
    (root / "transforms.json").write_text(json.dumps(meta))
    rescene = load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=3))
    assert rescene.K[0, 0] != scene.K[0, 0]                         # remade for the new camera
    assert not np.array_equal(np.asarray(rescene.images[1]), np.asarray(scene.images[1]))
    (root / "undistorted" / "camera.json").unlink()                  # a folder of the user's: kept, one line
    with pytest.raises(DataError, match="undistorted: exists but was not made by this loader"):
        load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=3))
    assert len(list((root / "undistorted").iterdir())) == 6


def test_instant_ngp_is_fisheye_is_undistorted_with_the_fisheye_model(tmp_path):
    """instant-ngp's colmap2nerf writes "is_fisheye": true with k1..k4 and no camera_model: the photos are
    undistorted with OPENCV_FISHEYE, the same images as a file that names the model (and not OPENCV's)."""
    lens = {"k1": 0.05, "k2": -0.01, "k3": 0.003, "k4": -0.001}
    ngp = tiny_capture(tmp_path / "ngp", size=(40, 30), meta_extra={"fl_x": 35.0, "fl_y": 35.0, "cx": 20.0,
                                                                     "cy": 15.0, "w": 40, "h": 30,
                                                                     "is_fisheye": True, **lens})
    named = tiny_capture(tmp_path / "named", size=(40, 30), meta_extra={"fl_x": 35.0, "fl_y": 35.0, "cx": 20.0,
                                                                         "cy": 15.0, "w": 40, "h": 30,
                                                                         "camera_model": "OPENCV_FISHEYE", **lens})
    assert read_capture(ngp).camera == read_capture(named).camera
    assert read_capture(ngp).camera.model == "OPENCV_FISHEYE"
    ours = load_scene(scene_args(ngp, dataset_type="nerfstudio", factor=1, llffhold=3))
    theirs = load_scene(scene_args(named, dataset_type="nerfstudio", factor=1, llffhold=3))
    assert np.array_equal(ours.K, theirs.K)
    assert np.array_equal(np.asarray(ours.images), np.asarray(theirs.images))
    as_opencv = Camera(40, 30, 35.0, 35.0, 20.0, 15.0, "OPENCV", tuple(lens.items()), 0.5)
    assert not np.allclose(pinhole_for(as_opencv).K, ours.K)
    zero = tiny_capture(tmp_path / "zero", meta_extra={"k5": 0.0, "s1": 0.0, "is_fisheye": False})
    assert read_capture(zero).camera.model == "PINHOLE"                  # zero terms are honoured: nothing to do


@pytest.mark.parametrize("cx, cy", [(12.0, 8.0), (12.5, 8.5), (11.25, 7.75), (3.7, 13.2), (20.0, 0.5)])
def test_rays_go_through_the_pixel_centres_of_a_tools_camera(tmp_path, cx, cy):
    """A capture described as COLMAP / nerfstudio / instant-ngp describe one (pixel (i, j) covers
    [i, i + 1) x [j, j + 1), its centre at (i + 0.5, j + 0.5), principal point (cx, cy) in those coordinates):
    points placed on pixel centres with that convention, at several depths, lie on the rays get_rays casts
    through those pixels, after loading and normalising (half a pixel off would be 0.5 / fx ~ 0.025 rad)."""
    root = tiny_capture(tmp_path / "cap", meta_extra={"cx": cx, "cy": cy})
    fx, fy = 20.0, 21.0
    capture = read_capture(root)
    scene = load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=4))
    images, poses, _, K, _, bounds = load_transforms_data(root, 1, 1, 4)
    s = scene.far / bounds.far
    shift = scene.poses[0, :3, 3] / s - poses[0, :3, 3]
    rng = np.random.default_rng(int(cx * 100))
    for k in scene.i_train:
        c2w = torch.tensor(scene.poses[k], dtype=torch.float64)
        rays_o, rays_d = get_rays(scene.H, scene.W, scene.K, c2w)
        i, j = rng.integers(0, scene.W, 20), rng.integers(0, scene.H, 20)
        depth = rng.uniform(1.0, 5.0, 20)
        cam = np.stack([(i + 0.5 - cx) / fx * depth, -(j + 0.5 - cy) / fy * depth, -depth], -1)   # OpenGL axes
        world = cam @ poses[k][:3, :3].T + poses[k][:3, 3]
        point = torch.tensor((world + shift) * s)
        o, d = rays_o[j, i].double(), rays_d[j, i].double()
        t = ((point - o) * d).sum(-1) / (d * d).sum(-1)
        miss = (o + t[:, None] * d - point).norm(dim=-1) / t / d.norm(dim=-1)           # radians
        assert float(miss.max()) < 1e-6, float(miss.max())
    assert capture.camera.pixel_centre == 0.5


def test_edited_photos_are_undistorted_again(tmp_path):
    """The undistorted images are remade when a photo changes at the same path, whether its size changes or
    not (also when its modification time is set back), and reused while nothing changes."""
    extra = {"camera_model": "OPENCV", "k1": -0.1, "k2": 0.02, "fl_x": 35.0, "fl_y": 35.0, "cx": 20.5,
             "cy": 14.0, "w": 40, "h": 30}
    root = tiny_capture(tmp_path / "cap", size=(40, 30), meta_extra=extra)
    args = scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=3)
    load_scene(args)
    capture = read_capture(root)
    u, v = source_pixels(capture.camera, pinhole_for(capture.camera))
    photo = root / "images" / "f1.png"
    rng = np.random.default_rng(7)
    for edit in ("same_size", "other_size_time_set_back", "unchanged"):
        before = photo.stat()
        if edit == "same_size":
            new = 255 - iio.imread(photo)                            # a PNG of the same pixels' complement
        elif edit == "other_size_time_set_back":
            new = np.full((30, 40, 3), rng.integers(0, 256), np.uint8)
        if edit != "unchanged":
            iio.imwrite(photo, new)
            if "set_back" in edit:
                os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
        stamp = (root / "undistorted" / "00001_f1.png").stat().st_mtime_ns
        scene = load_scene(args)
        expected = undistort_image(iio.imread(photo), u, v) / np.float32(255.0)
        assert np.array_equal(np.asarray(scene.images[1]), expected), edit           # frame 1: the edited one
        remade = (root / "undistorted" / "00001_f1.png").stat().st_mtime_ns != stamp
        assert remade == (edit != "unchanged"), edit


# --- Bounds and the scene's place --------------------------------------------------

def forward_capture(root: Path, offset=(0.0, 0.0, 0.0), ply: str = None) -> Path:
    """A forward-facing capture: 6 cameras on a 1 x 0.5 grid looking down -z, a foreground card of points
    3-4 units in front and a backdrop 20-25 units away, everything moved by `offset`; with `ply`, the points
    written in that PLY format ('ascii' or 'binary') and named by ply_file_path."""
    rng = np.random.default_rng(11)
    root.mkdir(parents=True)
    (root / "images").mkdir()
    offset = np.asarray(offset, dtype=np.float64)
    frames = []
    for k in range(6):
        c2w = np.eye(4)
        c2w[:3, 3] = np.array([0.5 * (k % 3) - 0.5, 0.5 * (k // 3), 0.0]) + offset
        iio.imwrite(root / "images" / f"f{k}.png", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
        frames.append({"file_path": f"images/f{k}.png", "transform_matrix": c2w.tolist()})
    meta = {"fl_x": 20.0, "fl_y": 20.0, "cx": 12.0, "cy": 8.0, "w": 24, "h": 16, "frames": frames}
    front = np.stack([rng.uniform(-1, 1, 300), rng.uniform(-0.6, 0.8, 300), -rng.uniform(3, 4, 300)], -1)
    back = np.stack([rng.uniform(-14, 14, 300), rng.uniform(-9, 10, 300), -rng.uniform(20, 25, 300)], -1)
    points = np.concatenate([front, back]) + offset
    if ply == "binary":
        write_ply_points(root / "points.ply", points, np.zeros((len(points), 3), np.uint8))
    elif ply == "ascii":
        lines = "".join(f"{x:.9g} {y:.9g} {z:.9g} 10 20 30\n" for x, y, z in points)
        (root / "points.ply").write_text(f"ply\nformat ascii 1.0\ncomment nerfstudio\nelement vertex {len(points)}\n"
                                         "property float x\nproperty float y\nproperty float z\n"
                                         "property uint8 red\nproperty uint8 green\nproperty uint8 blue\n"
                                         f"end_header\n{lines}")
    if ply:
        meta["ply_file_path"] = "points.ply"
    (root / "transforms.json").write_text(json.dumps(meta))
    np.save(root / "points.npy", points)
    return root


@pytest.mark.parametrize("ply", ["ascii", "binary"])
def test_bounds_from_the_sparse_points_keep_the_backdrop(tmp_path, ply, caplog):
    """With ply_file_path (nerfstudio's sparse points): per camera the 0.1 / 99.9 percentiles of the depths of
    the points it sees (projected with nerf.geometry.project, the rays' own convention), near 0.9 x the
    smallest, far the largest, as LLFF's imgs2poses; the run says where its bounds came from."""
    root = forward_capture(tmp_path / "cap", ply=ply)
    points = np.load(root / "points.npy")
    images, poses, _, K, _, bounds = load_transforms_data(root, 1, 1, 3)
    lows, highs = [], []
    for c2w in poses:
        i, j, depth = geometry.project(torch.tensor(points), torch.tensor(c2w[:3]), K)
        seen = ((depth > 0) & (i >= -0.5) & (i <= 23.5) & (j >= -0.5) & (j <= 15.5)).numpy()
        lows.append(np.percentile(depth.numpy()[seen], 0.1))
        highs.append(np.percentile(depth.numpy()[seen], 99.9))
    assert bounds.near == pytest.approx(0.9 * min(lows), rel=1e-5)          # ascii: float32 digits
    assert bounds.far == pytest.approx(max(highs), rel=1e-5) and bounds.far > 20
    with caplog.at_level("INFO", logger="nerf"):
        scene = load_scene(scene_args(root, dataset_type="nerfstudio", factor=1, llffhold=3))
    assert scene.far == pytest.approx(6.0) and scene.near == pytest.approx(6.0 * bounds.near / bounds.far)
    assert "sparse points" in caplog.text and f"far {bounds.far:.4g}" in caplog.text


def test_a_forward_facing_capture_without_bounds_keeps_its_background(fern_dir, tmp_path):
    """fern's poses as a transforms.json without near/far or points: the cameras' bounds must hold every depth
    COLMAP saw (poses_bounds.npy: 16.98 to 80.0), not stop at 1.5 x where the viewing axes meet (27.2)."""
    root = llff_as_transforms(fern_dir, tmp_path / "fern")
    colmap = np.load(fern_dir / "poses_bounds.npy")[:, 15:]
    _, poses, _, _, _, bounds = load_transforms_data(root, 1, 1, 8)
    assert bounds.near <= colmap.min() and bounds.far >= colmap.max()
    assert "forward-facing" in bounds.source


@pytest.mark.parametrize("ply", [None, "binary"])
def test_a_capture_far_from_its_origin_loads_to_the_same_scene(tmp_path, ply):
    """Moving a whole capture (cameras and points) by an offset, up to 1e7 units in several directions, gives
    the same normalised poses and bounds: the scene is recentred before scaling (else the positional encoding
    sees coordinates of size offset x 6 / far). Poses are compared in float32 after normalising, to 1e-5."""
    base = load_scene(scene_args(forward_capture(tmp_path / "base", ply=ply), dataset_type="nerfstudio",
                                 factor=1, llffhold=3))
    assert np.abs(base.poses[:, :3, 3]).max() < base.far
    for k, offset in enumerate([(30.0, 0, 0), (0, -1e3, 0), (1e5, 1e5, -1e5), (-3e6, 2e6, 1e7), (0, 0, 5e4)]):
        moved = load_scene(scene_args(forward_capture(tmp_path / f"moved{k}", offset, ply=ply),
                                      dataset_type="nerfstudio", factor=1, llffhold=3))
        assert np.allclose(moved.poses, base.poses, atol=1e-5, rtol=0), offset
        assert moved.near == pytest.approx(base.near, rel=1e-6) and moved.far == pytest.approx(base.far, rel=1e-6)
