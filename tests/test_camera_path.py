"""Camera paths: the OpenGL / OpenCV conventions with hand-computed values, the
camera_path.json format and its errors, and `--render_only --camera_path`
rendering the demo's test views exactly as `--render_only --render_test` does."""
import json
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

import run_nerf
from load_blender import load_blender_data
from nerf import camera_path
from nerf.demo_scene import ensure_demo_scene
from nerf.errors import DataError
from test_cli import QUIET, TINY, count_video_frames


TRAINED = ["--raw_noise_std", "0", "--lrate", "5e-3", "--N_samples", "16", "--N_importance", "16",
           "--multires", "10", "--multires_views", "4"]   # TINY learns the solids in 300 steps (test PSNR ~22)


def demo_args(demo_dir: Path, basedir: Path, *extra: str):
    return ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(basedir),
            "--expname", "demo", "--white_bkgd", "--testskip", "1", *TINY, *TRAINED, *QUIET, *extra]


_TRAINED = {}   # one trained demo a session, shared by this module and test_viewer.py


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """A demo scene (32x32, 3 test views) and a run trained on it for 300 steps
    (enough for the coloured solids to show): (data folder, basedir)."""
    if id(tmp_path_factory) not in _TRAINED:
        root = tmp_path_factory.mktemp("trained_demo")
        demo_dir = root / "demo"
        ensure_demo_scene(str(demo_dir), verbose=False, H=32, W=32, n_train=20, n_val=2, n_test=3)
        assert run_nerf.main(demo_args(demo_dir, root / "logs", "--N_iters", "300", "--i_weights", "300")) == 0
        _TRAINED[id(tmp_path_factory)] = demo_dir, root / "logs"
    return _TRAINED[id(tmp_path_factory)]


def rotation_x(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def test_opengl_to_opencv_by_hand():
    # A camera at (1, 2, 3) turned 90 degrees about the world x axis: OpenGL axes
    # right = (1, 0, 0), up = (0, 0, 1), back = (0, -1, 0), so it looks along +y.
    gl = np.eye(4)
    gl[:3, :3] = rotation_x(90)
    gl[:3, 3] = [1, 2, 3]
    cv = camera_path.opengl_to_opencv(gl)
    np.testing.assert_allclose(cv[:3, 0], [1, 0, 0], atol=1e-12)     # right stays right
    np.testing.assert_allclose(cv[:3, 1], [0, 0, -1], atol=1e-12)    # OpenCV y points down
    np.testing.assert_allclose(cv[:3, 2], [0, 1, 0], atol=1e-12)     # OpenCV z: where it looks
    np.testing.assert_allclose(cv[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(camera_path.opencv_to_opengl(cv), gl, atol=1e-12)
    # A point straight ahead (at y = 7) is at depth 5 along +z in OpenCV camera
    # coordinates and along -z in OpenGL ones.
    point = np.array([1, 7, 3, 1.0])
    assert (np.linalg.inv(cv) @ point)[:3] == pytest.approx([0, 0, 5])
    assert (np.linalg.inv(gl) @ point)[:3] == pytest.approx([0, 0, -5])


@pytest.mark.parametrize("seed", range(5))
def test_conversion_is_an_involution_and_keeps_the_centre(seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    gl = np.eye(4)
    gl[:3, :3], gl[:3, 3] = q * np.sign(np.linalg.det(q)), rng.normal(size=3)
    cv = camera_path.opengl_to_opencv(gl)
    np.testing.assert_allclose(camera_path.opencv_to_opengl(cv), gl, atol=1e-12)
    np.testing.assert_allclose(cv[:3, 2], -gl[:3, 2])
    np.testing.assert_allclose(cv[:3, 1], -gl[:3, 1])
    assert np.linalg.det(cv[:3, :3]) == pytest.approx(1.0)


@pytest.mark.parametrize("fov,H,focal", [(90.0, 100, 50.0), (60.0, 80, 40 * math.sqrt(3)),
                                         (120.0, 30, 15 / math.sqrt(3))])
def test_focal_and_fov_by_hand(fov, H, focal):
    assert camera_path.focal_from_fov(fov, H) == pytest.approx(focal)
    assert camera_path.fov_from_focal(focal, H) == pytest.approx(fov)


def test_interpolation_ends_on_the_keyframes_and_halves_the_turn():
    a, b = np.eye(4), np.eye(4)
    b[:3, :3], b[:3, 3] = rotation_x(90), [2, 0, -4]
    poses = camera_path.interpolate_poses([a, b], 5)
    np.testing.assert_allclose(poses[0], a, atol=1e-12)
    np.testing.assert_allclose(poses[-1], b, atol=1e-12)
    np.testing.assert_allclose(poses[2][:3, :3], rotation_x(45), atol=1e-12)
    np.testing.assert_allclose(poses[1][:3, 3], [0.5, 0, -1])
    for pose in poses:
        np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)


def axis_angle_rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues' formula in float64, written out for the test."""
    x, y, z = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    a = math.radians(degrees)
    c, s, C = math.cos(a), math.sin(a), 1 - math.cos(a)
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


TURN_AXES = [(1, 0, 0), (0, -1, 0), (0, 0, 1), (1, -1, 0), (1, 2, -3), (-2, 1, 0.5), (-1, -1, -1)]


@pytest.mark.parametrize("degrees", [0, 1e-6, 1, 45, 90, 135, 170, 179, 179.9999, 180])
def test_interpolation_through_keyframes_along_the_geodesic(degrees):
    """Three keyframes, each turned `degrees` from the previous one about an axis
    of the sweep (signs mixed: a half turn's axis must keep them), from a random
    start: frames 0, M and 2M are the keyframes to rounding, and frame j of a
    segment is the start turned j / M of the angle about the same axis (for a
    half turn, either sense of the axis is a shortest path)."""
    M = 8
    rng = np.random.default_rng(round(degrees * 1000))
    for axis_index, axis in enumerate(TURN_AXES):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        keys = [np.eye(4) for _ in range(3)]
        keys[0][:3, :3] = q * np.sign(np.linalg.det(q))
        second_axis = TURN_AXES[(axis_index + 3) % len(TURN_AXES)]
        for k, turn_axis in ((1, axis), (2, second_axis)):
            keys[k][:3, :3] = keys[k - 1][:3, :3] @ axis_angle_rotation(turn_axis, degrees)
            keys[k][:3, 3] = rng.normal(size=3)
        poses = camera_path.interpolate_poses(keys, 2 * M + 1)
        for k in range(3):
            np.testing.assert_allclose(poses[k * M], keys[k], atol=1e-12, err_msg=f"keyframe {k}, axis {axis}")
        for k, turn_axis in ((0, axis), (1, second_axis)):
            for j in range(1, M):
                pose = poses[k * M + j]
                senses = [1] if degrees < 180 else [1, -1]
                errors = [np.abs(pose[:3, :3] - keys[k][:3, :3] @ axis_angle_rotation(
                    sense * np.asarray(turn_axis), degrees * j / M)).max() for sense in senses]
                assert min(errors) < 1e-12, (k, j, turn_axis, errors)
                np.testing.assert_allclose(pose[:3, 3], keys[k][:3, 3] + j / M * (keys[k + 1][:3, 3] - keys[k][:3, 3]),
                                           atol=1e-12)


def test_written_matrices_are_row_major():
    poses = np.stack([np.eye(4)[:3], np.eye(4)[:3] + 0.5 * np.eye(3, 4, 3)])
    content = camera_path.camera_path_json(poses, [40.0, 50.0], 30, 40, 12)
    assert content["camera_path"][1]["camera_to_world"][3] == 0.5          # row-major: row 0, column 3
    assert content["camera_path"][1]["camera_to_world"][12:] == [0, 0, 0, 1]
    assert content["seconds"] == pytest.approx(2 / 12)


def test_save_and_load_round_trip(tmp_path):
    poses = camera_path.interpolate_poses([np.eye(4), np.diag([1.0, -1, -1, 1])], 7)
    content = camera_path.camera_path_json(poses, [30.0] * 3 + [45.0] * 4, 24, 32, 10)
    camera_path.save_camera_path(tmp_path / "camera_path.json", content)
    loaded = camera_path.load_camera_path(tmp_path / "camera_path.json")
    np.testing.assert_allclose(loaded.poses, poses)
    assert (loaded.H, loaded.W, loaded.fps) == (24, 32, 10)
    assert loaded.constant_fov_stretches() == [(0, 3), (3, 7)]
    assert loaded.intrinsics(0)[0, 0] == pytest.approx(12 / math.tan(math.radians(15)))


GOOD = {"render_height": 8, "render_width": 8, "fps": 24, "seconds": 1,
        "camera_path": [{"camera_to_world": np.eye(4).reshape(-1).tolist(), "fov": 50, "aspect": 1}]}


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("camera_path"), "has no 'camera_path'"),
    (lambda d: d.pop("fps"), "has no 'fps'"),
    (lambda d: d.update(camera_path=[]), "non-empty"),
    (lambda d: d.update(render_height=0), "render_height"),
    (lambda d: d.update(render_width=12.5), "render_width"),
    (lambda d: d.update(fps=-1), "'fps'"),
    (lambda d: d.update(camera_type="fisheye"), "fisheye"),
    (lambda d: d["camera_path"][0].update(camera_to_world=[1, 0, 0]), "16 numbers"),
    (lambda d: d["camera_path"][0].update(camera_to_world=[float("nan")] * 16), "finite"),
    (lambda d: d["camera_path"][0].update(camera_to_world=[1] * 16), "0 0 0 1"),
    (lambda d: d["camera_path"][0].update(fov=0), "'fov'"),
    (lambda d: d["camera_path"][0].update(fov=180), "below 180"),
    (lambda d: d["camera_path"][0].pop("fov"), "needs 'camera_to_world' and 'fov'"),
])
def test_malformed_paths_name_the_problem(tmp_path, edit, needle):
    data = json.loads(json.dumps(GOOD))
    edit(data)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=needle) as err:
        camera_path.load_camera_path(tmp_path / "p.json")
    assert str(tmp_path / "p.json") in err.value.where


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "\xff"])
def test_unreadable_paths(tmp_path, text):
    (tmp_path / "p.json").write_text(text, encoding="latin-1")
    with pytest.raises(DataError):
        camera_path.load_camera_path(tmp_path / "p.json")


def write_test_view_path(demo_dir: Path, dest: Path) -> Path:
    """camera_path.json holding the demo's test poses at their own field of view and size."""
    imgs, poses, _, (H, W, focal), (_, _, i_test) = load_blender_data(str(demo_dir), testskip=1)
    fov = camera_path.fov_from_focal(focal, H)
    camera_path.save_camera_path(dest, camera_path.camera_path_json(poses[i_test], [fov] * len(i_test), H, W, 5))
    return dest


def test_camera_path_renders_the_test_views_like_render_test(trained_demo, tmp_path, capsys):
    demo_dir, basedir = trained_demo
    path_file = write_test_view_path(demo_dir, tmp_path / "camera_path.json")
    assert run_nerf.main(demo_args(demo_dir, basedir, "--render_only", "--render_test")) == 0
    assert run_nerf.main(demo_args(demo_dir, basedir, "--render_only", "--camera_path", str(path_file))) == 0
    test_dir, path_dir = basedir / "demo" / "renderonly_test_000300", basedir / "demo" / "renderonly_camera_path_000300"
    frames = sorted(p.name for p in path_dir.glob("*.png"))
    assert frames == ["000.png", "001.png", "002.png"]
    for name in frames:
        ours = imageio.imread(path_dir / name).astype(int)
        theirs = imageio.imread(test_dir / name).astype(int)
        assert np.abs(ours - theirs).max() <= 1
        assert ours.std() > 10          # not a blank frame: the solids are there
    for k in range(3):
        np.testing.assert_allclose(np.load(path_dir / "depth" / f"{k:03d}.npy"),
                                   np.load(test_dir / "depth" / f"{k:03d}.npy"), rtol=1e-4, equal_nan=True)
    assert count_video_frames(path_dir / "video.mp4") == 3
    assert count_video_frames(path_dir / "depth.mp4") == 3


def test_camera_path_with_two_fields_of_view_renders_each_at_its_own(trained_demo, tmp_path):
    demo_dir, basedir = trained_demo
    _, poses, _, (H, W, focal), (_, _, i_test) = load_blender_data(str(demo_dir), testskip=1)
    fov = camera_path.fov_from_focal(focal, H)
    pose = poses[i_test[0]]
    dest = tmp_path / "zoom.json"
    camera_path.save_camera_path(dest, camera_path.camera_path_json([pose, pose], [fov, fov / 2], 20, 24, 2))
    assert run_nerf.main(demo_args(demo_dir, basedir, "--expname", "demo", "--render_only",
                                   "--camera_path", str(dest))) == 0
    frames = sorted((basedir / "demo" / "renderonly_camera_path_000300").glob("*.png"))
    wide, narrow = (imageio.imread(p).astype(float) for p in frames)
    assert wide.shape == narrow.shape == (20, 24, 3)
    # Halving the field of view magnifies the centre: the zoomed frame's centre
    # crop is not the wide frame's centre crop.
    assert np.abs(wide - narrow).mean() > 2


@pytest.mark.parametrize("problem", ["missing", "malformed", "no_render_only"])
def test_camera_path_errors_are_one_line_and_exit_2(trained_demo, tmp_path, capsys, problem):
    demo_dir, basedir = trained_demo
    path_file = tmp_path / "camera_path.json"
    if problem == "malformed":
        path_file.write_text('{"camera_path": [{"fov": 50}]}')
    extra = ["--camera_path", str(path_file)] + ([] if problem == "no_render_only" else ["--render_only"])
    before = sorted(p.name for p in (basedir / "demo").iterdir())
    assert run_nerf.main(demo_args(demo_dir, basedir, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("--camera_path" if problem == "no_render_only" else str(path_file)) in err[0]
    assert sorted(p.name for p in (basedir / "demo").iterdir()) == before


@pytest.mark.parametrize("fov_scale,aspect,ok", [(1.0, 1.0, True), (1.0001, 1.0, True), (0.8, 1.0, False),
                                                 (1.0, 1.5, False)])
def test_forward_facing_paths_keep_the_training_camera(tmp_path, fov_scale, aspect, ok):
    """NDC scenes: the path must keep the training camera's fov and aspect (render() takes
    its NDC from the rendering camera); other scenes take any camera."""
    from types import SimpleNamespace
    scene = SimpleNamespace(H=378, W=504, focal=407.6)
    H = 378
    W = round(504 * aspect)
    fov = camera_path.fov_from_focal(scene.focal, scene.H) * fov_scale
    path = camera_path.CameraPath(np.eye(4)[None], np.array([fov]), H, W, 24.0)
    camera_path.check_ndc_camera(path, scene, False, "p.json")
    if ok:
        camera_path.check_ndc_camera(path, scene, True, "p.json")
    else:
        with pytest.raises(DataError, match="training camera's field of view"):
            camera_path.check_ndc_camera(path, scene, True, "p.json")
