"""The built-in demo scene: file layout, ray convention, geometry, idempotent writing.

Rays here are rebuilt from the JSON files with the NeRF convention (SPEC.md
section 4) and intersected with closed forms, independently of demo_scene's
own ray caster, so a convention slip in either would show.
"""
import json
import os

import imageio.v2 as imageio
import numpy as np
import pytest

from nerf import demo_scene
from nerf.errors import DataError
from nerf.demo_scene import Box, Cylinder, Sphere

H = W = 40
COUNTS = {"train": 6, "val": 3, "test": 3}
BOUND = 1.25  # the scene promises to fit in a ball of about this radius


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    demo_scene.make_demo_scene(str(out), H=H, W=W, n_train=COUNTS["train"],
                               n_val=COUNTS["val"], n_test=COUNTS["test"])
    return out


def load_split(root, split):
    with open(root / f"transforms_{split}.json") as f:
        meta = json.load(f)
    imgs = [imageio.imread(root / (fr["file_path"] + ".png")) for fr in meta["frames"]]
    poses = [np.array(fr["transform_matrix"], dtype=np.float64) for fr in meta["frames"]]
    return meta, imgs, poses


def all_views(root):
    for split in COUNTS:
        meta, imgs, poses = load_split(root, split)
        focal = 0.5 * W / np.tan(0.5 * meta["camera_angle_x"])
        for img, c2w in zip(imgs, poses):
            yield img, c2w, focal


def nerf_ray(i, j, focal, c2w):
    """Pixel (i = column, j = row) ray, exactly as run_nerf_helpers.get_rays_np builds it."""
    d_cam = np.array([(i - W * 0.5) / focal, -(j - H * 0.5) / focal, -1.0])
    return c2w[:3, 3].copy(), c2w[:3, :3] @ d_cam


def sphere_hit(o, d, c, r):
    """Entry parameter t of o + t d into the sphere (c, r), or None."""
    oc = o - np.asarray(c)
    a, b, cc = d @ d, 2 * oc @ d, oc @ oc - r * r
    disc = b * b - 4 * a * cc
    if disc < 0:
        return None
    t = (-b - np.sqrt(disc)) / (2 * a)
    return t if t > 0 else None


def bounding_sphere(solid):
    if isinstance(solid, Sphere):
        return np.array(solid.center), solid.radius
    if isinstance(solid, Box):
        return np.array(solid.center), float(np.linalg.norm(solid.half))
    if isinstance(solid, Cylinder):
        zc, hz = (solid.z_min + solid.z_max) / 2, (solid.z_max - solid.z_min) / 2
        return np.array([*solid.center_xy, zc]), float(np.hypot(solid.radius, hz))
    raise TypeError(solid)


def lambert(albedo, normal):
    return np.array(albedo) * (demo_scene.AMBIENT
                               + (1 - demo_scene.AMBIENT) * max(0.0, normal @ demo_scene.LIGHT_DIR))


RED = next(s for s in demo_scene.SCENE if isinstance(s, Sphere) and s.albedo[0] > 0.8
           and s.albedo[1] < 0.2)


# (1) Layout ---------------------------------------------------------------


def test_files_parse_with_counts_paths_and_rgba_images(scene_dir):
    positions = {}
    for split, n in COUNTS.items():
        meta, imgs, poses = load_split(scene_dir, split)
        assert meta["camera_angle_x"] == pytest.approx(demo_scene.CAMERA_ANGLE_X)
        assert [fr["file_path"] for fr in meta["frames"]] == [f"./{split}/r_{k}" for k in range(n)]
        for img in imgs:
            assert img.shape == (H, W, 4) and img.dtype == np.uint8
            assert img[..., 3].max() == 255 and img[..., 3].min() == 0  # object and background
        for c2w in poses:
            R, t = c2w[:3, :3], c2w[:3, 3]
            np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
            np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-9)
            assert np.linalg.det(R) == pytest.approx(1.0)
            assert np.linalg.norm(t) == pytest.approx(demo_scene.RADIUS)
            assert t[2] > 0  # upper hemisphere, like lego
            # OpenGL camera looks down -z: its back axis points from the origin to it.
            np.testing.assert_allclose(R[:, 2], t / np.linalg.norm(t), atol=1e-9)
            # Upright, no roll: camera x stays horizontal and camera y leans to world up (+z).
            assert abs(R[2, 0]) < 1e-9 and R[2, 1] > 0
        positions[split] = np.array([p[:3, 3] for p in poses])
    # Held-out cameras are not training cameras, and not each other.
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        gaps = np.linalg.norm(positions[a][:, None] - positions[b][None], axis=-1)
        assert gaps.min() > 1e-3


def test_scene_fits_in_the_promised_ball():
    for solid in demo_scene.SCENE:
        c, r = bounding_sphere(solid)
        if isinstance(solid, Cylinder):  # farthest rim point is tighter than the ball
            far_xy = np.hypot(*solid.center_xy) + solid.radius
            reach = max(np.hypot(far_xy, z) for z in (solid.z_min, solid.z_max))
        else:
            reach = np.linalg.norm(c) + r
        assert reach <= demo_scene.SCENE_RADIUS <= BOUND


# (2) Pixel colours along independently built rays -----------------------


def test_sphere_pixels_have_the_shaded_sphere_colour(scene_dir):
    checked = 0
    others = [bounding_sphere(s) for s in demo_scene.SCENE if s is not RED]
    c = np.array(RED.center)
    for img, c2w, focal in all_views(scene_dir):
        for j in range(H):
            for i in range(W):
                o, d = nerf_ray(i, j, focal, c2w)
                u = d / np.linalg.norm(d)
                # Keep rays well inside the silhouette, so all sub-pixel rays hit it too.
                miss_dist = np.linalg.norm(np.cross(c - o, u))
                if miss_dist > 0.6 * RED.radius:
                    continue
                t = sphere_hit(o, d, c, RED.radius)
                # ... and in front of every other solid's bounding ball, grown by
                # a margin for the sub-pixel rays (no occlusion, even at edges).
                if any((s := sphere_hit(o, d, oc, orad + 0.1)) is not None and s < t
                       for oc, orad in others):
                    continue
                n = (o + t * d - c) / RED.radius
                expected = lambert(RED.albedo, n)
                assert img[j, i, 3] == 255
                np.testing.assert_allclose(img[j, i, :3] / 255.0, expected, atol=0.04)
                assert img[j, i, 0] > 3 * max(img[j, i, 1], img[j, i, 2])
                checked += 1
    assert checked >= 20  # the sphere is seen, unoccluded, in the views


def test_rays_missing_the_scene_ball_are_transparent(scene_dir):
    margin = 0.1  # room for the +-1/4 pixel supersampling rays
    checked = 0
    for img, c2w, focal in all_views(scene_dir):
        for j in range(H):
            for i in range(W):
                o, d = nerf_ray(i, j, focal, c2w)
                u = d / np.linalg.norm(d)
                if np.linalg.norm(np.cross(-o, u)) > BOUND + margin:
                    assert img[j, i, 3] == 0, (i, j)
                    checked += 1
    assert checked > 1000


# (3) The centre pixel looks at the origin, inside the box -----------------


def test_centre_pixel_sees_an_object(scene_dir):
    for img, c2w, focal in all_views(scene_dir):
        o, d = nerf_ray(W // 2, H // 2, focal, c2w)
        # No half-pixel offset: this ray is the optical axis and passes the origin.
        assert np.linalg.norm(np.cross(-o, d / np.linalg.norm(d))) < 1e-9
        assert img[H // 2, W // 2, 3] == 255
        assert img[H // 2, W // 2, :3].max() > 20  # a lit colour, not the empty black


# (4) ensure_demo_scene ----------------------------------------------------


SMALL = dict(H=16, W=16, n_train=3, n_val=2, n_test=2)


def snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_ensure_is_idempotent(tmp_path):
    out = tmp_path / "demo"
    assert demo_scene.ensure_demo_scene(str(out), verbose=False, **SMALL) == str(out)
    assert demo_scene.is_complete(str(out))
    before = snapshot(out)
    assert len(before) == 3 + 3 + 2 + 2
    demo_scene.ensure_demo_scene(str(out), verbose=False, **SMALL)
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no temporary folders left


def test_incomplete_folder_is_refused_not_replaced(tmp_path):
    out = tmp_path / "demo"
    demo_scene.make_demo_scene(str(out), **SMALL)
    os.remove(out / "test" / "r_1.png")  # someone's folder, not a whole scene
    before = snapshot(out)
    with pytest.raises(DataError, match="not a complete demo scene"):
        demo_scene.ensure_demo_scene(str(out), verbose=False, **SMALL)
    assert snapshot(out) == before
    (tmp_path / "empty").mkdir()
    demo_scene.ensure_demo_scene(str(tmp_path / "empty"), verbose=False, **SMALL)
    assert demo_scene.is_complete(str(tmp_path / "empty"))


def test_interrupted_write_leaves_nothing_that_counts(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    real_render = demo_scene.render_view
    calls = []

    def dying_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # mid-way through the training views' images
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(demo_scene, "render_view", dying_render)
    with pytest.raises(KeyboardInterrupt):
        demo_scene.ensure_demo_scene(str(out), verbose=False, **SMALL)
    assert not out.exists()
    assert not demo_scene.is_complete(str(out))
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(demo_scene, "render_view", real_render)
    demo_scene.ensure_demo_scene(str(out), verbose=False, **SMALL)
    assert demo_scene.is_complete(str(out))


# (5) Analytic depth --------------------------------------------------------


def test_depth_is_the_closed_form_sphere_distance():
    c = np.array(RED.center)
    outward = c / np.linalg.norm(c)  # nothing else lies beyond the sphere this way
    rng = np.random.default_rng(1)
    o = c + 3.0 * outward + 0.05 * rng.normal(size=(50, 3))
    targets = c + 0.7 * RED.radius * rng.uniform(-1, 1, size=(50, 3)) / np.sqrt(3)
    d = (targets - o) * rng.uniform(0.2, 3.0, size=(50, 1))  # not unit length, like NeRF's
    rgb, hit, depth = demo_scene.render_rays(o, d)
    assert hit.all()
    expected = [sphere_hit(oo, dd, c, RED.radius) for oo, dd in zip(o, d)]
    np.testing.assert_allclose(depth, expected, rtol=1e-10)
    # The point o + t d lies on the sphere.
    np.testing.assert_allclose(np.linalg.norm(o + depth[:, None] * d - c, axis=-1), RED.radius)


def test_depth_of_box_face_and_cylinder_cap():
    box = next(s for s in demo_scene.SCENE if isinstance(s, Box))
    cyl = next(s for s in demo_scene.SCENE if isinstance(s, Cylinder))
    x_face = box.center[0] + box.half[0]
    z_low = box.center[2] - 0.5 * box.half[2]  # below the ball on top
    o = np.array([[3.0, box.center[1], z_low], [cyl.center_xy[0], cyl.center_xy[1], 4.0]])
    d = np.array([[-2.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    _, hit, depth = demo_scene.render_rays(o, d)
    assert hit.all()
    np.testing.assert_allclose(depth, [(3.0 - x_face) / 2.0, 4.0 - cyl.z_max])
    _, _, idx = demo_scene.cast_rays(o, d)
    assert [demo_scene.SCENE[k] for k in idx] == [box, cyl]


def test_make_demo_scene_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    demo_scene.make_demo_scene(str(a), **SMALL)
    demo_scene.make_demo_scene(str(b), **SMALL)
    for split in COUNTS:
        assert (a / f"transforms_{split}.json").read_text() == (b / f"transforms_{split}.json").read_text()
    np.testing.assert_array_equal(imageio.imread(a / "train" / "r_2.png"),
                                  imageio.imread(b / "train" / "r_2.png"))
