"""imgs2poses.py and nerf/colmap_model.py: COLMAP models to LLFF poses_bounds.npy.

The synthetic tests need no COLMAP: they write COLMAP models by hand (text
and binary) from cameras and points whose true poses and depths are known.
The pycolmap tests reconstruct real photos and are skipped without pycolmap.
"""
from __future__ import annotations

import itertools
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from nerf import colmap_model as cm
from conftest import REPO

IMGS2POSES = str(REPO / "imgs2poses.py")


# --------------------------------------------------------------------------
# Independent helpers (deliberately not taken from the code under test)


def quat_from_rotmat(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix, by the largest-diagonal method."""
    tr = np.trace(R)
    if tr > 0:
        s = 2 * np.sqrt(1 + tr)
        q = [s / 4, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * np.sqrt(1 + R[i, i] - R[j, j] - R[k, k])
        q = np.zeros(4)
        q[0] = (R[k, j] - R[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (R[j, i] + R[i, j]) / s
        q[1 + k] = (R[k, i] + R[i, k]) / s
    return np.asarray(q, dtype=np.float64)


def random_rotation(rng: np.random.Generator, max_deg: float | None = None) -> np.ndarray:
    """A random rotation; with max_deg, about a random axis by at most that angle (Rodrigues)."""
    if max_deg is None:
        Q, Rr = np.linalg.qr(rng.normal(size=(3, 3)))
        Q = Q * np.sign(np.diag(Rr))
        return Q if np.linalg.det(Q) > 0 else -Q
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.radians(rng.uniform(-max_deg, max_deg))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising sum |s R src_i + t - dst_i|^2; src, dst (N, 3)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    S, D = src - mu_s, dst - mu_d
    U, sig, Vt = np.linalg.svd(D.T @ S / len(src))
    E = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        E[2, 2] = -1
    R = U @ E @ Vt
    s = float(np.trace(np.diag(sig) @ E) / (S ** 2).sum(1).mean())
    return s, R, mu_d - s * R @ mu_s


def rotation_angle_deg(A: np.ndarray, B: np.ndarray) -> float:
    """Angle of the rotation taking A to B (both 3x3 rotations)."""
    return float(np.degrees(np.arccos(np.clip((np.trace(A.T @ B) - 1) / 2, -1, 1))))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, IMGS2POSES, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------
# A synthetic scene written as a COLMAP model


class Scene:
    """Cameras looking down world +z at a box of points.

    images: list of dicts with id, name, camera_id, R (world-to-camera), t,
    c2w (camera x, y, z axes as columns), centre, keypoints (x, y, point id);
    cameras: id -> (model, width, height, params); points: id -> xyz;
    tracks: id -> list of (image id, keypoint index).
    """

    def __init__(self, seed: int = 0, names: list[str] | None = None) -> None:
        rng = np.random.default_rng(seed)
        names = names or ["c.png", "a.png", "e.png", "b.png", "d.png", "f.png"]
        self.cameras = {
            1: ("SIMPLE_RADIAL", 64, 48, [50.0, 32.0, 24.0, 0.01]),
            4: ("PINHOLE", 80, 60, [70.0, 71.0, 40.0, 30.0]),
        }
        pts = rng.uniform([-3, -2, 5], [3, 2, 12], size=(200, 3))
        self.points = {100 + 3 * j: p for j, p in enumerate(pts)}
        self.tracks: dict[int, list[tuple[int, int]]] = {pid: [] for pid in self.points}
        self.images = []
        image_ids = [7, 3, 12, 5, 9, 20, 2, 14][:len(names)]  # not contiguous, not in name order
        for k, (image_id, name) in enumerate(zip(image_ids, names)):
            c2w = random_rotation(rng, max_deg=15)
            centre = np.array([0.6 * (k - len(names) / 2), rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.5)])
            R = c2w.T
            t = -R @ centre
            cam_id = 1 if k % 2 == 0 else 4
            _, w, h, params = self.cameras[cam_id]
            fx, fy = params[0], params[1] if cam_id == 4 else params[0]
            cx, cy = params[-2:] if cam_id == 4 else params[1:3]
            keypoints = [(1.5, 2.5, -1)]  # a keypoint without a 3D point
            for pid, X in self.points.items():
                Xc = R @ X + t
                u, v = fx * Xc[0] / Xc[2] + cx, fy * Xc[1] / Xc[2] + cy
                if Xc[2] > 0 and 0 <= u < w and 0 <= v < h:
                    self.tracks[pid].append((image_id, len(keypoints)))
                    keypoints.append((u, v, pid))
            self.images.append(dict(id=image_id, name=name, camera_id=cam_id, R=R, t=t, c2w=c2w,
                                    centre=centre, keypoints=keypoints))

    def expected_depths(self, image: dict) -> np.ndarray:
        """z-depths of the points this image sees: distance along its optical axis."""
        forward = image["c2w"][:, 2]
        seen = [pid for pid, track in self.tracks.items()
                if len(track) >= 2 and any(i == image["id"] for i, _ in track)]  # as written
        return np.array([(self.points[pid] - image["centre"]) @ forward for pid in seen])

    def expected_row(self, image: dict) -> np.ndarray:
        """The LLFF row: rotation columns (down, right, back) = (y, x, -z) camera axes."""
        c2w = image["c2w"]
        model, w, h, params = self.cameras[image["camera_id"]]
        pose = np.column_stack([c2w[:, 1], c2w[:, 0], -c2w[:, 2], image["centre"], [h, w, params[0]]])
        z = self.expected_depths(image)
        return np.concatenate([pose.ravel(), [np.percentile(z, 0.1), np.percentile(z, 99.9)]])

    def write_text(self, folder: Path, drop: tuple[str, ...] = ()) -> Path:
        """cameras.txt, images.txt, points3D.txt; images named in ``drop`` are left out."""
        folder.mkdir(parents=True, exist_ok=True)
        kept = [im for im in self.images if im["name"] not in drop]
        kept_ids = {im["id"] for im in kept}
        with open(folder / "cameras.txt", "w") as f:
            f.write("# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n")
            for cid, (model, w, h, params) in self.cameras.items():
                f.write(f"{cid} {model} {w} {h} {' '.join(repr(float(p)) for p in params)}\n")
        with open(folder / "images.txt", "w") as f:
            f.write("# Image list with two lines of data per image:\n")
            for im in kept:
                q = quat_from_rotmat(im["R"])
                f.write(" ".join([str(im["id"]), *map(repr, map(float, q)), *map(repr, map(float, im["t"])),
                                  str(im["camera_id"]), im["name"]]) + "\n")
                f.write(" ".join(f"{float(x)!r} {float(y)!r} {pid}" for x, y, pid in im["keypoints"]) + "\n")
        with open(folder / "points3D.txt", "w") as f:
            f.write("# 3D point list with one line of data per point:\n")
            for pid, X in self.points.items():
                track = [(i, k) for i, k in self.tracks[pid] if i in kept_ids]
                if len(track) < 2:
                    continue
                f.write(" ".join([str(pid), *map(repr, map(float, X)), "10 20 30", "0.5",
                                  *[f"{i} {k}" for i, k in track]]) + "\n")
        return folder

    def write_binary(self, folder: Path) -> Path:
        """The same model in COLMAP's binary layout, packed here with struct."""
        folder.mkdir(parents=True, exist_ok=True)
        ids = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4, "FOV": 7}
        with open(folder / "cameras.bin", "wb") as f:
            f.write(struct.pack("<Q", len(self.cameras)))
            for cid, (model, w, h, params) in self.cameras.items():
                f.write(struct.pack("<IiQQ", cid, ids[model], w, h))
                f.write(struct.pack(f"<{len(params)}d", *params))
        with open(folder / "images.bin", "wb") as f:
            f.write(struct.pack("<Q", len(self.images)))
            for im in self.images:
                f.write(struct.pack("<I7dI", im["id"], *quat_from_rotmat(im["R"]), *im["t"], im["camera_id"]))
                f.write(im["name"].encode() + b"\0")
                f.write(struct.pack("<Q", len(im["keypoints"])))
                for x, y, pid in im["keypoints"]:
                    f.write(struct.pack("<ddQ", x, y, pid if pid >= 0 else 2 ** 64 - 1))
        kept = {pid: tr for pid, tr in self.tracks.items() if len(tr) >= 2}
        with open(folder / "points3D.bin", "wb") as f:
            f.write(struct.pack("<Q", len(kept)))
            for pid, track in kept.items():
                f.write(struct.pack("<Q3d3BdQ", pid, *self.points[pid], 10, 20, 30, 0.5, len(track)))
                for i, k in track:
                    f.write(struct.pack("<II", i, k))
        return folder

    def expected(self, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        chosen = sorted((im for im in self.images if names is None or im["name"] in names),
                        key=lambda im: im["name"])
        return np.stack([self.expected_row(im) for im in chosen]), [im["name"] for im in chosen]


def make_scene_dir(root: Path, scene: Scene, extra: tuple[str, ...] = ()) -> Path:
    """<root>/images/ with a small PNG per scene image (plus ``extra`` names)."""
    images = root / "images"
    images.mkdir(parents=True)
    for name in [im["name"] for im in scene.images] + list(extra):
        imageio.imwrite(images / name, np.full((6, 8, 3), 128, np.uint8))
    return root


# --------------------------------------------------------------------------
# Pure conversion, no COLMAP


def test_quaternion_matches_independent_inverse():
    rng = np.random.default_rng(1)
    for _ in range(50):
        R = random_rotation(rng)
        q = quat_from_rotmat(R) * rng.choice([-1, 1]) * rng.uniform(0.5, 2)  # sign and scale free
        np.testing.assert_allclose(cm.qvec_to_rotmat(q), R, atol=1e-12)
    # 90 degrees about z: x -> y
    np.testing.assert_allclose(cm.qvec_to_rotmat([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)]) @ [1, 0, 0],
                               [0, 1, 0], atol=1e-12)


def test_llff_axes_by_hand():
    # Camera at (1, 2, 3) with COLMAP axes equal to the world's (R = I): looks down +z,
    # image down is +y, right is +x. LLFF columns: down, right, back, centre, hwf.
    t = -np.array([1.0, 2.0, 3.0])
    pose = cm.colmap_to_llff_pose(np.eye(3), t, 48, 64, 50)
    np.testing.assert_allclose(pose, [[0, 1, 0, 1, 48], [1, 0, 0, 2, 64], [0, 0, -1, 3, 50]], atol=1e-12)
    # Rolled 90 degrees about the optical axis: camera x points along world +y.
    R_c2w = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # columns: camera x, y, z in world
    pose = cm.colmap_to_llff_pose(R_c2w.T, np.zeros(3), 1, 1, 1)
    np.testing.assert_allclose(pose[:, 0], [-1, 0, 0], atol=1e-12)  # down = camera y
    np.testing.assert_allclose(pose[:, 1], [0, 1, 0], atol=1e-12)  # right = camera x
    np.testing.assert_allclose(pose[:, 2], [0, 0, -1], atol=1e-12)  # back = -camera z
    assert np.linalg.det(pose[:, :3]) == pytest.approx(1.0)


def test_text_model_round_trip(tmp_path):
    scene = Scene()
    model = cm.read_model(scene.write_text(tmp_path / "sparse"))
    assert model.fmt == "txt" and len(model.images) == 6 and model.cameras[4].model == "PINHOLE"
    rows, names = cm.model_to_poses_bounds(model)
    want, want_names = scene.expected()
    assert names == sorted(names) == want_names
    assert rows.shape == (6, 17)
    np.testing.assert_allclose(rows[:, :15], want[:, :15], atol=1e-9)
    # hwf follows each image's own camera: 'a.png' is the 2nd image (camera 4, PINHOLE -> fx)
    a = rows[names.index("a.png"), :15].reshape(3, 5)
    assert list(a[:, 4]) == [60, 80, 70.0]
    c = rows[names.index("c.png"), :15].reshape(3, 5)
    assert list(c[:, 4]) == [48, 64, 50.0]
    # bounds: percentiles of the true z-depths, bracketing almost all of them
    np.testing.assert_allclose(rows[:, 15:], want[:, 15:], rtol=1e-9)
    for row, name in zip(rows, names):
        z = scene.expected_depths(next(im for im in scene.images if im["name"] == name))
        near, far = row[15:]
        assert 0 < z.min() <= near < far <= z.max()
        assert np.sum((z < near) | (z > far)) <= 2  # only the extreme point at each end


def test_binary_model_equals_text(tmp_path):
    scene = Scene(seed=3)
    text_rows, text_names = cm.model_to_poses_bounds(cm.read_model(scene.write_text(tmp_path / "txt")))
    model = cm.read_model(scene.write_binary(tmp_path / "bin"))
    assert model.fmt == "bin"
    im = next(iter(model.images.values()))
    assert im.point3d_ids[0] == -1  # 2^64-1 means "no 3D point"
    rows, names = cm.model_to_poses_bounds(model)
    assert names == text_names
    np.testing.assert_allclose(rows, text_rows, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rows, scene.expected()[0], atol=1e-9)


def test_reader_handles_empty_keypoint_line_and_comments(tmp_path):
    (tmp_path / "cameras.txt").write_text("# c\n\n1 SIMPLE_PINHOLE 10 8 9.5 5 4\n")
    (tmp_path / "images.txt").write_text(
        "# header\n1 1 0 0 0 0 0 0 1 first.png\n\n2 1 0 0 0 0 0 1 1 second.png\n3.5 4.5 7\n")
    (tmp_path / "points3D.txt").write_text("# none\n7 0 0 2 1 2 3 0.1 2 0\n")
    model = cm.read_model(tmp_path)
    assert sorted(im.name for im in model.images.values()) == ["first.png", "second.png"]
    assert model.images[1].xys.shape == (0, 2)
    assert model.images[2].point3d_ids.tolist() == [7]
    rows, names = cm.model_to_poses_bounds(model, ["second.png"])
    assert names == ["second.png"]
    assert rows[0, 15] == rows[0, 16] == pytest.approx(3.0)  # point z=2, camera at z=-1
    with pytest.raises(cm.ColmapModelError, match="first.png observes no 3D point"):
        cm.model_to_poses_bounds(model)


@pytest.mark.parametrize("model,params", [("SIMPLE_PINHOLE", [30.0, 5, 4]), ("PINHOLE", [30.0, 33, 5, 4]),
                                          ("SIMPLE_RADIAL", [30.0, 5, 4, 0.1]),
                                          ("RADIAL", [30.0, 5, 4, 0.1, 0.01])])
def test_supported_camera_models_give_focal(model, params):
    assert cm.camera_focal(cm.Camera(1, model, 10, 8, np.array(params))) == 30.0


def test_unsupported_camera_model_refused(tmp_path):
    scene = Scene()
    scene.cameras[4] = ("FOV", 80, 60, [70.0, 71.0, 40.0, 30.0, 0.9])
    for fmt, folder in (("txt", scene.write_text(tmp_path / "t")), ("bin", scene.write_binary(tmp_path / "b"))):
        model = cm.read_model(folder)
        assert model.cameras[4].model == "FOV" and len(model.cameras[4].params) == 5
        with pytest.raises(cm.ColmapModelError) as err:
            cm.model_to_poses_bounds(model)
        assert err.value.path == str(folder / f"cameras.{fmt}")
        assert "FOV" in err.value.message and "OPENCV_FISHEYE" in err.value.message
    scene_dir = make_scene_dir(tmp_path / "scene", scene)
    proc = run_cli(scene_dir, "--sparse", tmp_path / "t")
    assert_one_error_line(proc, "cameras.txt", "FOV", "OPENCV")
    assert not (scene_dir / "poses_bounds.npy").exists() and not (scene_dir / "transforms.json").exists()


def test_transforms_json_cameras_see_the_points_where_colmap_does(tmp_path):
    """transforms.json's OpenGL c2w and intrinsics, through the rays' convention (nerf.geometry.project),
    put every observed 3D point on its COLMAP keypoint (u = fx x/z + cx in COLMAP's camera)."""
    import torch
    from nerf.geometry import project
    scene = Scene(seed=4)
    model = cm.read_model(scene.write_binary(tmp_path / "b"))
    rows, names = cm.model_to_poses_bounds(model)
    meta = cm.model_to_transforms(model, rows, names)
    assert [f["file_path"] for f in meta["frames"]] == [f"images/{n}" for n in names]
    assert meta["near"] == pytest.approx(0.9 * rows[:, 15].min()) and meta["far"] == rows[:, 16].max()
    by_name = {im["name"]: im for im in scene.images}
    checked = 0
    for frame in meta["frames"]:
        image = by_name[frame["file_path"][len("images/"):]]
        K = np.array([[frame["fl_x"], 0, frame["cx"]], [0, frame["fl_y"], frame["cy"]], [0, 0, 1]])
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)[:3]
        pids = [pid for _, _, pid in image["keypoints"] if pid >= 0]
        uv = np.array([(u, v) for u, v, pid in image["keypoints"] if pid >= 0])
        pts = torch.tensor(np.stack([scene.points[pid] for pid in pids]), dtype=torch.float64)
        i, j, depth = project(pts, c2w, K)
        np.testing.assert_allclose(np.stack([i.numpy(), j.numpy()], 1), uv, atol=1e-9)
        assert (depth > 0).all()
        checked += len(pids)
    assert checked > 100
    assert {f["camera_model"] for f in meta["frames"]} == {"OPENCV", "PINHOLE"}      # two cameras: per frame


def test_truncated_binary_and_missing_model(tmp_path):
    scene = Scene()
    folder = scene.write_binary(tmp_path / "b")
    data = (folder / "points3D.bin").read_bytes()
    (folder / "points3D.bin").write_bytes(data[:-5])
    with pytest.raises(cm.ColmapModelError, match="ends early"):
        cm.read_model(folder)
    scene_dir = make_scene_dir(tmp_path / "scene", scene)
    assert_one_error_line(run_cli(scene_dir, "--sparse", folder), "points3D.bin", "ends early")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(run_cli(scene_dir, "--sparse", empty), str(empty), "not a COLMAP sparse model")
    assert_one_error_line(run_cli(scene_dir, "--sparse", tmp_path / "nope"), "--sparse", "no such folder")


# --------------------------------------------------------------------------
# The command line with --sparse (no COLMAP run)


def test_cli_sparse_writes_rows_names_and_no_unregistered(tmp_path):
    scene = Scene(seed=5)
    scene_dir = make_scene_dir(tmp_path / "scene", scene)
    (scene_dir / "unregistered.txt").write_text("stale.png\n")  # from an earlier run
    scene.write_text(scene_dir / "sparse" / "0")
    proc = run_cli(scene_dir, "--sparse", scene_dir / "sparse")  # the folder above 0/ works too
    assert proc.returncode == 0, proc.stderr
    # The remarks: the two cameras' focal lengths differ, and NeRF takes one; the placeholder photos are not
    # the cameras' size, so transforms.json is written but nothing is undistorted.
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("warning: images not undistorted: ") and "a.png: is 8x6 but" in lines[0]
    assert lines[1:] == ["warning: focal lengths differ between images (50.0 to 70.0 px); "
                         "NeRF uses a single focal length (the first image's)"]
    assert json.loads((scene_dir / "transforms.json").read_text())["frames"][0]["file_path"] == "images/a.png"
    rows = np.load(scene_dir / "poses_bounds.npy")
    names = (scene_dir / "poses_names.txt").read_text().splitlines()
    want, want_names = scene.expected()
    assert names == want_names
    assert rows.shape == (6, 17) and rows.dtype == np.float64
    np.testing.assert_allclose(rows, want, atol=1e-9)
    assert not (scene_dir / "unregistered.txt").exists()


def test_cli_writes_the_sparse_points_whose_bounds_are_the_rows_bounds(tmp_path):
    """sparse_pc.ply (named by transforms.json's ply_file_path) holds the model's points, in the frames' world
    coordinates: the loader's bounds from the points each camera sees (nerf.sparse_points.point_bounds, with the
    K the loader builds from the file's cx, cy) are the bounds of the rows COLMAP's tracks give, camera by
    camera (the synthetic scene has no occlusion: a camera observes every point in its view)."""
    from nerf.load_transforms import TOOLS_PIXEL_CENTRE
    from nerf.sparse_points import point_bounds, read_ply_points
    scene = Scene(seed=5)
    scene_dir = make_scene_dir(tmp_path / "scene", scene)
    scene.write_text(scene_dir / "sparse" / "0")
    assert run_cli(scene_dir, "--sparse", scene_dir / "sparse").returncode == 0
    meta = json.loads((scene_dir / "transforms.json").read_text())
    points = read_ply_points(scene_dir / meta["ply_file_path"])
    model = cm.read_model(scene_dir / "sparse" / "0")
    np.testing.assert_array_equal(points, model.points3d.xyz)
    rows = np.load(scene_dir / "poses_bounds.npy")
    for k, frame in enumerate(meta["frames"]):
        K = np.array([[frame["fl_x"], 0, frame["cx"] - TOOLS_PIXEL_CENTRE],
                      [0, frame["fl_y"], frame["cy"] - TOOLS_PIXEL_CENTRE], [0, 0, 1]])
        near, far = point_bounds(points, np.array(frame["transform_matrix"])[None], K, frame["h"], frame["w"])
        assert near == pytest.approx(0.9 * rows[k, 15], rel=1e-9) and far == pytest.approx(rows[k, 16], rel=1e-9)


def test_unregistered_images_named_and_excluded(tmp_path):
    names = ["img_01.png", "img_02.png", "img_03.jpg", "img_04.png", "img_05.JPG", "img_06.png", "img_07.png"]
    scene = Scene(seed=7, names=names)
    scene_dir = make_scene_dir(tmp_path / "scene", scene, extra=("notes.txt",))
    dropped = ("img_03.jpg", "img_06.png")
    scene.write_text(tmp_path / "model", drop=dropped)
    proc = run_cli(scene_dir, "--sparse", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "did not register" in ln]
    assert len(warning) == 1 and "2 of 7 images" in warning[0]
    assert all(n in warning[0] for n in dropped)
    assert (scene_dir / "unregistered.txt").read_text().splitlines() == list(dropped)
    kept = [n for n in names if n not in dropped]
    assert (scene_dir / "poses_names.txt").read_text().splitlines() == kept
    rows = np.load(scene_dir / "poses_bounds.npy")
    assert rows.shape == (5, 17)
    # Each row is the pose of the image named on the same line: nothing shifted.
    want, want_names = scene.expected(kept)
    assert want_names == kept
    np.testing.assert_allclose(rows[:, :15], want[:, :15], atol=1e-9)
    # Registering them later removes unregistered.txt.
    scene.write_text(tmp_path / "model2")
    assert run_cli(scene_dir, "--sparse", tmp_path / "model2").returncode == 0
    assert not (scene_dir / "unregistered.txt").exists()
    assert len((scene_dir / "poses_names.txt").read_text().splitlines()) == 7


def test_model_images_missing_from_folder_are_ignored(tmp_path):
    scene = Scene(seed=2)
    scene_dir = make_scene_dir(tmp_path / "scene", scene)
    (scene_dir / "images" / "b.png").unlink()
    scene.write_text(tmp_path / "model")
    proc = run_cli(scene_dir, "--sparse", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr
    assert "not in" in proc.stderr and "b.png" in proc.stderr
    assert "b.png" not in (scene_dir / "poses_names.txt").read_text().splitlines()
    assert np.load(scene_dir / "poses_bounds.npy").shape == (5, 17)
    assert not (scene_dir / "unregistered.txt").exists()


def test_cli_errors_are_one_line(tmp_path):
    assert_one_error_line(run_cli(tmp_path / "missing"), "missing", "no such folder")
    assert_one_error_line(run_cli(tmp_path), str(tmp_path / "images"), "no such folder")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("no photos")
    assert_one_error_line(run_cli(tmp_path), "no photos")


def test_missing_pycolmap_says_how_to_install(tmp_path):
    blocker = tmp_path / "block" / "pycolmap"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    scene_dir = make_scene_dir(tmp_path / "scene", Scene())
    env = {"PYTHONPATH": str(tmp_path / "block"), "PATH": "/usr/bin:/bin"}
    line = assert_one_error_line(run_cli(scene_dir, env=env), "pycolmap", "requirements-colmap.txt")
    assert "--sparse" in line
    assert not (scene_dir / "database.db").exists()


def test_earlier_reconstruction_is_not_overwritten(tmp_path):
    scene_dir = make_scene_dir(tmp_path / "scene", Scene())
    (scene_dir / "sparse" / "0").mkdir(parents=True)
    (scene_dir / "sparse" / "0" / "keep.txt").write_text("mine")
    assert_one_error_line(run_cli(scene_dir), "sparse/0", "--sparse")
    assert (scene_dir / "sparse" / "0" / "keep.txt").read_text() == "mine"


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(4)
    src = rng.normal(size=(20, 3))
    R = random_rotation(rng)
    dst = 2.5 * src @ R.T + [1, -2, 3]
    s, R_est, t = umeyama(src, dst)
    assert s == pytest.approx(2.5) and rotation_angle_deg(R, R_est) < 1e-6
    np.testing.assert_allclose(t, [1, -2, 3], atol=1e-9)


# --------------------------------------------------------------------------
# Real reconstructions with pycolmap


def test_pycolmap_reads_our_text_model_the_same(tmp_path):
    """COLMAP itself agrees with our reading of a text model, and writes a binary
    model that we read identically (the format as COLMAP 4 writes it)."""
    pycolmap = pytest.importorskip("pycolmap")
    scene = Scene(seed=9)
    text = scene.write_text(tmp_path / "txt")
    rec = pycolmap.Reconstruction(str(text))
    ours = cm.read_model(text)
    for image_id, image in ours.images.items():
        M = rec.image(image_id).cam_from_world()
        M = M.matrix() if hasattr(M, "matrix") else M
        np.testing.assert_allclose(cm.qvec_to_rotmat(image.qvec), np.asarray(M)[:, :3], atol=1e-12)
        np.testing.assert_allclose(image.tvec, np.asarray(M)[:, 3], atol=1e-12)
    binary = tmp_path / "bin"
    binary.mkdir()
    rec.write_binary(str(binary))
    rows_bin, names_bin = cm.model_to_poses_bounds(cm.read_model(binary))
    rows_txt, names_txt = cm.model_to_poses_bounds(ours)
    assert names_bin == names_txt
    np.testing.assert_allclose(rows_bin, rows_txt, atol=1e-9)


@pytest.fixture(scope="module")
def fern_reconstruction(fern_dir, tmp_path_factory):
    """imgs2poses.py on a copy of fern's images_8 (20 photos, 504x378): (scene dir, seconds, process)."""
    pytest.importorskip("pycolmap")
    scene_dir = tmp_path_factory.mktemp("fern_colmap")
    shutil.copytree(fern_dir / "images_8", scene_dir / "images")
    start = time.time()
    proc = run_cli(scene_dir, "--num_threads", "2")
    return scene_dir, time.time() - start, proc


@pytest.mark.slow
def test_fern_reconstruction_matches_shipped_poses(fern_reconstruction, fern_dir):
    scene_dir, seconds, proc = fern_reconstruction
    assert proc.returncode == 0, proc.stderr
    rows = np.load(scene_dir / "poses_bounds.npy")
    ref = np.load(fern_dir / "poses_bounds.npy")
    names = (scene_dir / "poses_names.txt").read_text().splitlines()
    assert names == sorted(p.name for p in (fern_dir / "images_8").iterdir())
    assert rows.shape == (20, 17)
    assert not (scene_dir / "unregistered.txt").exists()
    assert (scene_dir / "sparse" / "0" / "images.bin").exists()
    ours, theirs = rows[:, :15].reshape(-1, 3, 5), ref[:, :15].reshape(-1, 3, 5)
    assert np.all(ours[:, 0, 4] == 378) and np.all(ours[:, 1, 4] == 504)
    assert ours[:, 2, 4] == pytest.approx(theirs[:, 2, 4] / 8, rel=0.05)
    assert np.all(rows[:, 15] > 0) and np.all(rows[:, 15] < rows[:, 16])

    s, R, t = umeyama(ours[:, :, 3], theirs[:, :, 3])
    aligned = s * ours[:, :, 3] @ R.T + t
    extent = max(np.linalg.norm(a - b) for a, b in itertools.combinations(theirs[:, :, 3], 2))
    centre_err = np.linalg.norm(aligned - theirs[:, :, 3], axis=1).max() / extent
    rot_err = max(rotation_angle_deg(theirs[i, :, :3], R @ ours[i, :, :3]) for i in range(20))
    print(f"\nfern: {seconds:.1f} s, centre error max {100 * centre_err:.2f}% of extent "
          f"({extent:.2f}), rotation error max {rot_err:.2f} deg, focal {ours[0, 2, 4]:.1f} "
          f"vs {theirs[0, 2, 4] / 8:.1f}")
    assert centre_err < 0.02
    assert rot_err < 2.0
    # Same depth convention as the shipped bounds (once in the same scale).
    assert np.median(s * rows[:, 15]) == pytest.approx(np.median(ref[:, 15]), rel=0.15)
    assert np.median(s * rows[:, 16]) == pytest.approx(np.median(ref[:, 16]), rel=0.25)


def test_photo_that_does_not_register_is_excluded(fern_dir, tmp_path):
    pytest.importorskip("pycolmap")
    images = tmp_path / "images"
    images.mkdir()
    for name in ["image000.png", "image001.png", "image002.png", "image003.png", "image004.png"]:
        shutil.copy(fern_dir / "images_8" / name, images / name)
    noise = (np.random.default_rng(0).random((378, 504, 3)) * 255).astype(np.uint8)
    imageio.imwrite(images / "image002_noise.png", noise)  # sorts among the real photos
    proc = run_cli(tmp_path, "--num_threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert "image002_noise.png" in proc.stderr and "did not register" in proc.stderr
    assert (tmp_path / "unregistered.txt").read_text().splitlines() == ["image002_noise.png"]
    names = (tmp_path / "poses_names.txt").read_text().splitlines()
    assert names == ["image000.png", "image001.png", "image002.png", "image003.png", "image004.png"]
    rows = np.load(tmp_path / "poses_bounds.npy")
    assert rows.shape == (5, 17)
    # Each row holds its own photo's pose: aligned to the shipped poses of the
    # same five photos, the centres agree (a shifted row would not).
    ref = np.load(fern_dir / "poses_bounds.npy")[:5, :15].reshape(-1, 3, 5)[:, :, 3]
    ours = rows[:, :15].reshape(-1, 3, 5)[:, :, 3]
    s, R, t = umeyama(ours, ref)
    extent = max(np.linalg.norm(a - b) for a, b in itertools.combinations(ref, 2))
    assert np.linalg.norm(s * ours @ R.T + t - ref, axis=1).max() < 0.05 * extent
    assert np.linalg.norm(s * ours[[1, 0, 2, 3, 4]] @ R.T + t - ref, axis=1).max() > 0.05 * extent


@pytest.mark.slow
def test_fern_reconstruction_loads_and_trains(fern_reconstruction, tmp_path):
    """The reconstruction is a scene the loader and the trainer take as is."""
    import run_nerf
    from load_llff import load_llff_data

    scene_dir, _, proc = fern_reconstruction
    assert proc.returncode == 0, proc.stderr
    images, poses, bds, render_poses, _ = load_llff_data(scene_dir, factor=8)
    assert images.shape == (20, 47, 63, 3)
    assert poses[0, :, 4] == pytest.approx([47, 63, poses[0, 2, 4]])
    assert np.all(bds[:, 0] < bds[:, 1]) and render_poses.shape == (120, 3, 5)

    argv = ["--datadir", str(scene_dir), "--basedir", str(tmp_path), "--expname", "own", "--factor", "8",
            "--netdepth", "2", "--netwidth", "16", "--netdepth_fine", "2", "--netwidth_fine", "16",
            "--N_samples", "4", "--N_importance", "4", "--N_rand", "64", "--N_iters", "3", "--i_weights", "3",
            "--i_print", "1000", "--i_img", "1000", "--i_testset", "1000", "--i_video", "1000"]
    assert run_nerf.main(argv) == 0
    assert (tmp_path / "own" / "000003.tar").exists()


@pytest.fixture(scope="module")
def fern_opencv(fern_dir, tmp_path_factory):
    """imgs2poses.py --camera_model OPENCV on a copy of fern's images_8: (scene dir, process)."""
    pytest.importorskip("pycolmap")
    scene_dir = tmp_path_factory.mktemp("fern_opencv")
    shutil.copytree(fern_dir / "images_8", scene_dir / "images")
    return scene_dir, run_cli(scene_dir, "--num_threads", "2", "--camera_model", "OPENCV")


@pytest.mark.slow
def test_fern_opencv_writes_undistorted_images_and_a_transforms_json_that_loads(fern_opencv):
    """The OPENCV camera's intrinsics reach transforms.json; the photos are undistorted once into
    undistorted/; --dataset_type nerfstudio loads them with the pinhole camera; the transforms' OpenGL
    cameras are poses_bounds.npy's LLFF cameras (columns down, right, back) re-ordered."""
    from nerf.datasets import load_scene
    from nerf.load_transforms import read_capture
    from nerf.undistort import pinhole_for
    import run_nerf
    scene_dir, proc = fern_opencv
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((scene_dir / "transforms.json").read_text())
    model = cm.read_model(scene_dir / "sparse" / "0")
    (camera,) = model.cameras.values()
    assert camera.model == "OPENCV" and meta["camera_model"] == "OPENCV"
    assert [meta[k] for k in ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "p1", "p2")] == list(camera.params)
    assert (meta["w"], meta["h"]) == (504, 378) and len(meta["frames"]) == 20
    undistorted = sorted((scene_dir / "undistorted").glob("*.png"))
    assert len(undistorted) == 20 and "Undistorted 20 images (OPENCV)" in proc.stdout
    rows = np.load(scene_dir / "poses_bounds.npy")[:, :15].reshape(-1, 3, 5)
    c2w = np.array([f["transform_matrix"] for f in meta["frames"]])
    np.testing.assert_allclose(c2w[:, :3, 3], rows[:, :, 3], atol=1e-9)
    np.testing.assert_allclose(c2w[:, :3, 0], rows[:, :, 1], atol=1e-9)
    np.testing.assert_allclose(c2w[:, :3, 1], -rows[:, :, 0], atol=1e-9)
    np.testing.assert_allclose(c2w[:, :3, 2], rows[:, :, 2], atol=1e-9)
    args = run_nerf.config_parser().parse_args(["--datadir", str(scene_dir), "--dataset_type", "nerfstudio",
                                                "--factor", "1"])
    scene = load_scene(args)
    assert np.array_equal(scene.K, pinhole_for(read_capture(scene_dir).camera).K)
    assert (scene.H, scene.W) == (378, 504) and len(scene.i_test) == 3
    assert np.array_equal(scene.images.values[0], imageio.imread(undistorted[0]))
