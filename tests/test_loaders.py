"""The four dataset loaders, on the shared real scenes (read-only) and on tiny
synthetic scenes built in tmp.

Expected values come from the original's saved outputs (reference/*.npz),
from the raw files read directly, or from float64 re-derivations of SPEC.md
section 5. Full-resolution lego is loaded once for this module.
"""
import json
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import load_blender
from conftest import scene_copy_without
from nerf.errors import DataError
from load_blender import load_blender_data
from load_deepvoxels import load_dv_data
from load_LINEMOD import load_LINEMOD_data
from load_llff import load_llff_data
from test_camera_path import demo_args
import test_camera_path

trained_demo = test_camera_path.trained_demo     # the fixture, shared


def normalize(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def assert_close_rel(got, want, rel=1e-5):
    """Equal to `rel` of the reference's magnitude (entries near 0 included)."""
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def image_names(folder: Path):
    return sorted(f for f in os.listdir(folder) if f.endswith((".JPG", ".jpg", ".png")))


@pytest.fixture(scope="module")
def fern8(fern_dir):
    return load_llff_data(str(fern_dir), factor=8)


@pytest.fixture(scope="module")
def fern_raw(fern_dir):
    """poses_bounds.npy as written by COLMAP/LLFF: (N, 3, 5) poses and (N, 2) bounds, float64."""
    arr = np.load(fern_dir / "poses_bounds.npy").astype(np.float64)
    return arr[:, :15].reshape(-1, 3, 5), arr[:, 15:]


@pytest.fixture(scope="module")
def lego_full(lego_dir):
    return load_blender_data(str(lego_dir), half_res=False, testskip=8)


# --- LLFF --------------------------------------------------------------------

def test_fern_factor8_matches_the_original(fern8, reference_dir):
    images, poses, bds, render_poses, i_test = fern8
    ref = np.load(reference_dir / "llff_fern_factor8.npz")
    assert images.shape == tuple(ref["shape"]) == (20, 378, 504, 3)
    assert images.dtype == poses.dtype == bds.dtype == render_poses.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert poses.shape == (20, 3, 5) and bds.shape == (20, 2) and render_poses.shape == (120, 3, 5)
    assert_close_rel(poses, ref["poses"])
    assert_close_rel(bds, ref["bds"])
    assert_close_rel(render_poses, ref["render_poses"])
    assert i_test == int(ref["i_test"]) == 12
    # the original's float32 means, summed in its memory order (images stacked on the last axis)
    stacked_last = np.ascontiguousarray(np.moveaxis(images, 0, -1))
    np.testing.assert_allclose(np.moveaxis(stacked_last, -1, 0).mean((1, 2, 3)), ref["image_mean"], rtol=1e-5)


def test_fern_poses_rederived_from_poses_bounds(fern8, fern_raw):
    """SPEC section 5 in float64: hwf from the images and focal/8, rotation
    columns [c1, -c0, c2], scale 1/(min bds * .75), recentre on the average pose,
    spiral path around it, i_test nearest the average centre."""
    images, poses, bds, render_poses, i_test = fern8
    P, B = fern_raw
    np.testing.assert_array_equal(poses[:, 0, 4], 378)
    np.testing.assert_array_equal(poses[:, 1, 4], 504)
    np.testing.assert_allclose(poses[:, 2, 4], P[:, 2, 4] / 8, rtol=1e-6)

    R = np.stack([P[:, :, 1], -P[:, :, 0], P[:, :, 2]], -1)
    sc = 1 / (B.min() * 0.75)
    t = P[:, :, 3] * sc
    np.testing.assert_allclose(bds, B * sc, rtol=1e-6)
    z = normalize(R[:, :, 2].sum(0))
    x = normalize(np.cross(R[:, :, 1].sum(0), z))
    avg = np.eye(4)
    avg[:3, :4] = np.stack([x, np.cross(z, x), z, t.mean(0)], 1)
    c2w = np.zeros((20, 4, 4))
    c2w[:, :3, :3], c2w[:, :3, 3], c2w[:, 3, 3] = R, t, 1
    want = np.linalg.inv(avg) @ c2w
    np.testing.assert_allclose(poses[:, :3, :4], want[:, :3, :4], rtol=0, atol=2e-5)
    assert i_test == int(np.argmin(np.sum(want[:, :3, 3] ** 2, -1)))

    # Spiral: centres (r0 cos th, -r1 sin th, -r2 sin(th/2)) in the (now identity)
    # average frame, each camera's -z axis through the focus point (0, 0, -focus).
    focus = 1 / ((1 - 0.75) / (bds.min() * 0.9) + 0.75 / (bds.max() * 5))
    rads = np.percentile(np.abs(want[:, :3, 3]), 90, 0)
    th = np.linspace(0, 4 * np.pi, 121)[:-1]
    centres = np.stack([rads[0] * np.cos(th), -rads[1] * np.sin(th), -rads[2] * np.sin(0.5 * th)], -1)
    np.testing.assert_allclose(render_poses[:, :, 3], centres, rtol=0, atol=1e-5)
    to_focus = normalize(np.array([0, 0, -focus]) - centres)
    np.testing.assert_allclose(-render_poses[:, :, 2], to_focus, rtol=0, atol=1e-5)
    np.testing.assert_allclose(render_poses[:, :, 4], np.broadcast_to(poses[0, :, 4], (120, 3)))


def test_fern_missing_downsampled_folder_is_made_in_python(fern_dir, fern_raw, tmp_path):
    """A scene without images_16: the loader makes it from images/ inside
    the scene being loaded. Two photos keep this fast."""
    names = image_names(fern_dir / "images")[:2]
    (tmp_path / "images").mkdir()
    for name in names:
        os.symlink(fern_dir / "images" / name, tmp_path / "images" / name)
    np.save(tmp_path / "poses_bounds.npy", np.load(fern_dir / "poses_bounds.npy")[:2])

    assert not (tmp_path / "images_16").exists()

    images, poses, _, _, _ = load_llff_data(str(tmp_path), factor=16)

    assert image_names(tmp_path / "images_16") == [Path(n).stem + ".png" for n in names]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no half-made folder left
    assert images.shape == (2, 189, 252, 3)
    np.testing.assert_array_equal(poses[:, :2, 4], [[189, 252]] * 2)
    np.testing.assert_allclose(poses[:, 2, 4], fern_raw[0][:2, 2, 4] / 16, rtol=1e-6)
    for k, name in enumerate(names):
        small = iio.imread(tmp_path / "images_16" / (Path(name).stem + ".png"))
        assert small.shape == (189, 252, 3)
        np.testing.assert_allclose(images[k], small / 255.0, rtol=0, atol=1e-6)
        with Image.open(fern_dir / "images" / name) as full:
            full.draft("RGB", (full.width // 8, full.height // 8))   # JPEG DCT-domain 1/8 decode: same mean, fast
            full_mean = np.asarray(full.convert("RGB")).mean((0, 1)) / 255.0
        np.testing.assert_allclose(images[k].mean((0, 1)), full_mean, rtol=0, atol=0.01)


def test_fern_path_zflat(fern_dir, fern8):
    """The original crashed here (N_views /= 2 made a float count)."""
    _, _, bds, render_poses, _ = load_llff_data(str(fern_dir), factor=8, path_zflat=True)
    assert render_poses.shape == (60, 3, 5)
    close_depth = bds.min() * 0.9
    # Flat: every centre at the same depth, moved back by close_depth * .1.
    np.testing.assert_allclose(render_poses[:, 2, 3], -0.1 * close_depth, rtol=0, atol=1e-5)
    assert np.ptp(fern8[3][:, 2, 3]) > 1e-2                       # the default path is not flat
    th = np.linspace(0, 2 * np.pi, 61)[:-1]                       # one turn
    radius_x = np.percentile(np.abs(fern8[1][:, 0, 3]), 90)
    np.testing.assert_allclose(render_poses[:, 0, 3], radius_x * np.cos(th), rtol=0, atol=1e-4)


def test_fern_spherify(fern_dir):
    _, poses, bds, render_poses, _ = load_llff_data(str(fern_dir), factor=8, spherify=True)
    assert render_poses.shape == (120, 3, 5) and poses.shape == (20, 3, 5)
    centres = poses[:, :3, 3].astype(np.float64)
    assert np.sqrt(np.mean(np.sum(centres ** 2, -1))) == pytest.approx(1.0, abs=1e-5)
    path = render_poses[:, :3, 3].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(path, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(path[:, 2], centres[:, 2].mean(), atol=1e-5)      # circle at mean height
    np.testing.assert_allclose(render_poses[:, :3, 2], normalize(path), atol=1e-5)   # looking at the centre
    rot = render_poses[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    np.testing.assert_allclose(render_poses[:, :, 4], np.broadcast_to(poses[0, :, 4], (120, 3)))


def test_fern_poses_names_selects_the_listed_images(fern_dir, fern_raw, tmp_path):
    originals = image_names(fern_dir / "images")
    small = image_names(fern_dir / "images_8")
    pick = [11, 3, 17, 6]
    os.symlink(fern_dir / "images", tmp_path / "images")
    os.symlink(fern_dir / "images_8", tmp_path / "images_8")
    np.save(tmp_path / "poses_bounds.npy", np.load(fern_dir / "poses_bounds.npy")[pick])
    (tmp_path / "poses_names.txt").write_text("".join(originals[i] + "\n" for i in pick))

    images, poses, bds, _, _ = load_llff_data(str(tmp_path), factor=8, recenter=False, bd_factor=None)

    assert images.shape == (4, 378, 504, 3)
    for k, i in enumerate(pick):
        np.testing.assert_array_equal(images[k], (iio.imread(fern_dir / "images_8" / small[i]) / 255.0)
                                      .astype(np.float32))
    P, B = fern_raw
    np.testing.assert_allclose(poses[:, :3, 0], P[pick, :, 1], rtol=1e-6)
    np.testing.assert_allclose(poses[:, :3, 3], P[pick, :, 3], rtol=1e-6)
    np.testing.assert_allclose(bds, B[pick], rtol=1e-6)


def test_fern_pose_and_image_count_mismatch(fern_dir, tmp_path):
    os.symlink(fern_dir / "images_8", tmp_path / "images_8")
    np.save(tmp_path / "poses_bounds.npy", np.load(fern_dir / "poses_bounds.npy")[:5])
    with pytest.raises(DataError) as err:
        load_llff_data(str(tmp_path), factor=8)
    assert Path(err.value.where).name == "poses_bounds.npy"
    assert "poses_bounds.npy" in str(err.value)
    assert "5" in err.value.what and "20" in err.value.what


# --- Blender -----------------------------------------------------------------

@pytest.mark.slow
def test_lego_matches_the_original(lego_full, lego_dir, reference_dir):
    imgs, poses, render_poses, hwf, i_split = lego_full
    ref = np.load(reference_dir / "blender_lego_testskip8.npz")
    assert imgs.shape == (138, 800, 800, 4) and imgs.dtype == np.float32
    assert_close_rel(poses, ref["poses"])
    assert_close_rel(np.asarray(render_poses), ref["render_poses"])
    assert hwf[0] == 800 and hwf[1] == 800
    np.testing.assert_allclose(hwf, ref["hwf"], rtol=1e-6)
    for got, key in zip(i_split, ("i_train", "i_val", "i_test")):
        np.testing.assert_array_equal(got, ref[key])

    meta = json.loads((lego_dir / "transforms_test.json").read_text())
    assert hwf[2] == pytest.approx(0.5 * 800 / np.tan(0.5 * meta["camera_angle_x"]), rel=1e-7)
    first_test = i_split[2][0]
    np.testing.assert_array_equal(poses[first_test], np.array(meta["frames"][0]["transform_matrix"], np.float32))
    raw = iio.imread(lego_dir / (meta["frames"][0]["file_path"] + ".png"))
    np.testing.assert_allclose(imgs[first_test], raw / 255.0, rtol=0, atol=1e-6)
    # The 360 path: radius 4, 30 degrees above the equator, looking at the origin.
    centres = np.asarray(render_poses)[:, :3, 3].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=-1), 4.0, atol=1e-5)
    np.testing.assert_allclose(centres[:, 2], 4.0 * np.sin(np.pi / 6), atol=1e-5)
    np.testing.assert_allclose(np.asarray(render_poses)[:, :3, 2], centres / 4.0, atol=1e-5)


@pytest.mark.slow
def test_lego_white_background_compositing(lego_full, lego_dir):
    """rgb * a + (1 - a) on the loaded straight-alpha RGBA equals PIL's
    compositing of the PNG over white."""
    imgs = lego_full[0]
    frame = json.loads((lego_dir / "transforms_train.json").read_text())["frames"][0]
    rgba = imgs[0]
    comp = rgba[..., :3] * rgba[..., -1:] + (1.0 - rgba[..., -1:])
    with Image.open(lego_dir / (frame["file_path"] + ".png")) as im:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        pil = np.asarray(Image.alpha_composite(white, im.convert("RGBA")))[..., :3] / 255.0
    np.testing.assert_allclose(comp, pil, rtol=0, atol=1.5 / 255)
    background = rgba[..., 3] == 0
    assert background.mean() > 0.3                                 # lego has plenty of it
    assert np.all(comp[background] == 1.0)
    opaque = rgba[..., 3] == 1
    np.testing.assert_array_equal(comp[opaque], rgba[..., :3][opaque])


def write_blender_subset(lego_dir: Path, dest: Path, counts):
    """A scene with the first `counts[split]` frames of each split, images symlinked."""
    for split, n in counts.items():
        os.symlink(lego_dir / split, dest / split)
        meta = json.loads((lego_dir / f"transforms_{split}.json").read_text())
        meta["frames"] = meta["frames"][:n]
        (dest / f"transforms_{split}.json").write_text(json.dumps(meta))


def test_lego_half_res_is_the_2x2_block_mean(lego_dir, tmp_path):
    write_blender_subset(lego_dir, tmp_path, {"train": 2, "val": 1, "test": 1})
    imgs, poses, render_poses, hwf, i_split = load_blender_data(str(tmp_path), half_res=True, testskip=1)
    assert imgs.shape == (4, 400, 400, 4)
    meta = json.loads((lego_dir / "transforms_train.json").read_text())
    full_focal = 0.5 * 800 / np.tan(0.5 * meta["camera_angle_x"])
    assert hwf[0] == 400 and hwf[1] == 400
    assert hwf[2] == pytest.approx(full_focal / 2, rel=1e-7)
    assert [list(s) for s in i_split] == [[0, 1], [2], [3]]
    files = [(s, f) for s, n in (("train", 2), ("val", 1), ("test", 1))
             for f in json.loads((lego_dir / f"transforms_{s}.json").read_text())["frames"][:n]]
    for k, (_, frame) in enumerate(files):
        full = iio.imread(lego_dir / (frame["file_path"] + ".png")).astype(np.float64) / 255.0
        block = full.reshape(400, 2, 400, 2, 4).mean((1, 3))
        np.testing.assert_allclose(imgs[k], block, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(poses[k], np.array(frame["transform_matrix"], np.float32))


def test_lego_testskip1_names_the_missing_frame(lego_dir, tmp_path, monkeypatch):
    """A lego without val/r_1.png (as the shared data, which keeps every 8th
    val/test frame). Pixels are not decoded here (imread stubbed) so the walk
    over the 100 train frames is quick; the existence check that must fire
    comes before any decoding."""
    scene = scene_copy_without(lego_dir, tmp_path / "lego", "val/r_1.png")
    monkeypatch.setattr(load_blender.iio, "imread", lambda path: np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(DataError) as err:
        load_blender_data(str(scene), testskip=1)
    missing = Path(err.value.where)
    assert missing == scene / "val" / "r_1.png"
    assert not missing.exists()
    assert "r_1.png" in str(err.value)


# --- DeepVoxels (synthetic) ----------------------------------------------------

def random_pose(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pose = np.eye(4)
    pose[:3, :3] = q * np.sign(np.linalg.det(q))
    pose[:3, 3] = rng.normal(size=3)
    return pose


def test_deepvoxels_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    scene, counts = "cube", {"train": 3, "validation": 4, "test": 5}
    written = {}
    for split, n in counts.items():
        base = tmp_path / split / scene
        (base / "rgb").mkdir(parents=True)
        (base / "pose").mkdir()
        written[split] = []
        for k in range(n):
            img = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            pose = random_pose(rng)
            iio.imwrite(base / "rgb" / f"{k:06d}.png", img)
            (base / "pose" / f"{k:06d}.txt").write_text(" ".join(f"{v:.9f}" for v in pose.ravel()))
            written[split].append((img, pose))
    (tmp_path / "train" / scene / "intrinsics.txt").write_text("10. 4. 4. 0.\n0. 0. 0.\n0.\n1.\n8 8\n")

    imgs, poses, render_poses, hwf, i_split = load_dv_data(scene=scene, basedir=str(tmp_path), testskip=2)

    kept = written["train"] + written["validation"][::2] + written["test"][::2]
    assert imgs.shape == (3 + 2 + 3, 8, 8, 3) and poses.shape == (8, 3, 4)
    assert [list(s) for s in i_split] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert hwf[0] == 8 and hwf[1] == 8                   # the images' size (the original said 512 whatever they were)
    assert hwf[2] == pytest.approx(10.0)
    for k, (img, pose) in enumerate(kept):
        np.testing.assert_allclose(imgs[k], img / 255.0, atol=1e-6)
        # OpenCV -> OpenGL camera axes: y and z columns negated, x and centre kept.
        np.testing.assert_allclose(poses[k, :, 0], pose[:3, 0], atol=1e-6)
        np.testing.assert_allclose(poses[k, :, 1], -pose[:3, 1], atol=1e-6)
        np.testing.assert_allclose(poses[k, :, 2], -pose[:3, 2], atol=1e-6)
        np.testing.assert_allclose(poses[k, :, 3], pose[:3, 3], atol=1e-6)
    np.testing.assert_array_equal(render_poses, poses[5:])


# --- LINEMOD (synthetic) -------------------------------------------------------

@pytest.mark.parametrize("half_res", [False, True])
def test_linemod_synthetic(tmp_path, half_res):
    rng = np.random.default_rng(1)
    K = [[12.5, 0.0, 4.2], [0.0, 11.0, 3.9], [0.0, 0.0, 1.0]]
    bounds = {"train": (1.37, 2.21), "test": (1.52, 3.4)}
    written = []
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        (tmp_path / split).mkdir()
        frames = []
        for k in range(n):
            img = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
            pose = random_pose(rng)
            path = tmp_path / split / f"{k:04d}.png"
            iio.imwrite(path, img)
            # train gives absolute paths, the others paths relative to the scene
            file_path = str(path) if split == "train" else f"{split}/{k:04d}.png"
            frames.append({"file_path": file_path, "transform_matrix": pose.tolist(), "intrinsic_matrix": K})
            written.append((img, pose))
        meta = {"frames": frames}
        if split in bounds:
            meta["near"], meta["far"] = bounds[split]
        (tmp_path / f"transforms_{split}.json").write_text(json.dumps(meta))

    imgs, poses, render_poses, hwf, K_out, i_split, near, far = load_LINEMOD_data(str(tmp_path), half_res=half_res)

    side = 4 if half_res else 8
    assert imgs.shape == (7, side, side, 4) and poses.shape == (7, 4, 4)
    assert np.asarray(render_poses).shape == (40, 4, 4)
    assert [list(s) for s in i_split] == [[0, 1, 2], [3, 4], [5, 6]]
    assert near == 1.0 and far == 4.0                     # floor(min(1.37, 1.52)), ceil(max(2.21, 3.4))
    scale = 0.5 if half_res else 1.0
    want_K = np.array(K)
    want_K[:2] *= scale
    np.testing.assert_allclose(np.asarray(K_out, dtype=np.float64), want_K)
    assert hwf[0] == side and hwf[1] == side and hwf[2] == pytest.approx(12.5 * scale)
    for k, (img, pose) in enumerate(written):
        want = img / 255.0
        if half_res:
            want = want.reshape(4, 2, 4, 2, 4).mean((1, 3))
        np.testing.assert_allclose(imgs[k], want, atol=1e-6)
        np.testing.assert_allclose(poses[k], pose, atol=1e-6)


# --- The demo scene in the DeepVoxels and LINEMOD layouts, trained ------------------

def psnr_of_folder(folder: Path, truth: np.ndarray) -> float:
    """Mean PSNR of `folder`/000.png, 001.png, ... against truth (n, H, W, 3) in [0, 1]."""
    renders = [iio.imread(folder / f"{k:03d}.png")[..., :3] / 255.0 for k in range(len(truth))]
    return float(np.mean([-10 * np.log10(np.mean((r - t) ** 2)) for r, t in zip(renders, truth)]))


def demo_test_truth(demo_dir: Path) -> np.ndarray:
    """The Blender-layout demo's test views composited on white, (n, H, W, 3), float64."""
    meta = json.loads((demo_dir / "transforms_test.json").read_text())
    rgba = np.stack([iio.imread(demo_dir / (f["file_path"] + ".png")) / 255.0 for f in meta["frames"]])
    return rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:]


def test_demo_in_the_deepvoxels_and_linemod_layouts_loads_as_the_blender_one(tmp_path):
    from nerf.demo_scene import DEEPVOXELS_WORLD_SCALE, ensure_demo_scene, write_deepvoxels_layout, \
        write_linemod_layout
    blender = Path(ensure_demo_scene(str(tmp_path / "b"), verbose=False, H=24, W=32, n_train=4, n_val=2, n_test=3))
    imgs, poses, _, (H, W, focal), i_split = load_blender_data(str(blender), testskip=1)
    lm = load_LINEMOD_data(write_linemod_layout(str(blender), str(tmp_path / "lm")), testskip=1)
    np.testing.assert_array_equal(lm[0], imgs)
    np.testing.assert_array_equal(lm[1], poses)
    assert lm[3] == [H, W, focal] and (lm[6], lm[7]) == (2.0, 6.0)
    np.testing.assert_array_equal(lm[4], [[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    dv_imgs, dv_poses, dv_render, dv_hwf, dv_split = load_dv_data(
        "demo", write_deepvoxels_layout(str(blender), str(tmp_path / "dv")), testskip=1)
    assert dv_hwf[:2] == [H, W] and dv_hwf[2] == pytest.approx(focal, rel=1e-12)
    for got, want in zip(dv_split + lm[5], i_split + i_split):
        np.testing.assert_array_equal(got, want)
    # The same cameras (rotations in OpenGL axes again; the world scaled) and the
    # same pictures on white, to the 8-bit rounding of the composite.
    np.testing.assert_allclose(dv_poses[:, :3, :3], poses[:, :3, :3], atol=1e-6)
    np.testing.assert_allclose(dv_poses[:, :3, 3], DEEPVOXELS_WORLD_SCALE * poses[:, :3, 3], atol=1e-6)
    np.testing.assert_allclose(dv_imgs, imgs[..., :3] * imgs[..., 3:] + 1 - imgs[..., 3:], atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(dv_render, dv_poses[i_split[2]])


def test_linemod_file_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    """The original LINEMOD loader read each `file_path` as given, relative to
    where it ran: such a scene loads (and passes the data check) here too."""
    import run_nerf
    from nerf import data_checks
    from nerf.demo_scene import ensure_demo_scene, write_linemod_layout
    blender = ensure_demo_scene(str(tmp_path / "b"), verbose=False, H=16, W=16, n_train=2, n_val=1, n_test=1)
    scene = Path(write_linemod_layout(blender, str(tmp_path / "data" / "lm")))
    want = load_LINEMOD_data(str(scene), testskip=1)[0]
    for split in ("train", "val", "test"):
        meta = json.loads((scene / f"transforms_{split}.json").read_text())
        for frame in meta["frames"]:
            frame["file_path"] = str(Path("data") / "lm" / frame["file_path"])
        (scene / f"transforms_{split}.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(load_LINEMOD_data(str(scene), testskip=1)[0], want)
    args = run_nerf.config_parser().parse_args(["--dataset_type", "LINEMOD", "--datadir", str(scene)])
    assert data_checks.check_data(args) == (16, 16)
    monkeypatch.chdir(scene)      # from elsewhere, the files are not found, and the error names one
    with pytest.raises(DataError, match="missing"):
        load_LINEMOD_data(str(scene), testskip=1)


@pytest.mark.parametrize("N_rand,ok", [(24 * 32, True), (24 * 32 + 1, False)])
def test_deepvoxels_checks_use_the_images_size(tmp_path, N_rand, ok):
    """The data check reads the DeepVoxels images' size (it said 512 x 512):
    --no_batching draws at most one image's pixels."""
    import run_nerf
    from nerf import data_checks
    from nerf.demo_scene import ensure_demo_scene, write_deepvoxels_layout
    blender = ensure_demo_scene(str(tmp_path / "b"), verbose=False, H=24, W=32, n_train=2, n_val=1, n_test=1)
    dv = write_deepvoxels_layout(blender, str(tmp_path / "dv"))
    args = run_nerf.config_parser().parse_args(["--dataset_type", "deepvoxels", "--datadir", dv, "--shape", "demo",
                                                "--no_batching", "--N_rand", str(N_rand), "--testskip", "1"])
    if ok:
        assert data_checks.check_data(args) == (24, 32)
    else:
        with pytest.raises(DataError, match="from the 32x24 = 768 pixels of one image"):
            data_checks.check_data(args)


@pytest.mark.slow
def test_demo_in_the_deepvoxels_and_linemod_layouts_trains_like_the_blender_one(trained_demo, tmp_path):
    """The demo trained 300 steps through run_nerf.py from each layout, with the
    settings of the shared Blender-layout run: LINEMOD gives that run's very
    weights (the same images and rays); DeepVoxels (its world scaled to its
    fixed bounds, the mean camera distance +-1) renders the held-out views
    about as well."""
    import torch
    import run_nerf
    from nerf.demo_scene import write_deepvoxels_layout, write_linemod_layout
    demo_dir, basedir = trained_demo
    truth = demo_test_truth(demo_dir)
    assert run_nerf.main(demo_args(demo_dir, basedir, "--render_only", "--render_test")) == 0
    blender_psnr = psnr_of_folder(basedir / "demo" / "renderonly_test_000300", truth)
    steps = ["--N_iters", "300", "--i_weights", "300", "--i_testset", "300"]

    lm_dir = write_linemod_layout(str(demo_dir), str(tmp_path / "lm"))
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--dataset_type", "LINEMOD", "--datadir", lm_dir,
                                   "--expname", "lm", *steps)) == 0
    ours = torch.load(tmp_path / "lm" / "000300.tar", weights_only=True)
    theirs = torch.load(basedir / "demo" / "000300.tar", weights_only=True)
    for key in ("network_fn_state_dict", "network_fine_state_dict"):
        for name, value in theirs[key].items():
            assert torch.equal(ours[key][name], value), (key, name)
    assert psnr_of_folder(tmp_path / "lm" / "testset_000300", truth) == blender_psnr

    dv_dir = write_deepvoxels_layout(str(demo_dir), str(tmp_path / "dv"))
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--dataset_type", "deepvoxels", "--datadir", dv_dir,
                                   "--shape", "demo", "--expname", "dv", *steps)) == 0
    dv_psnr = psnr_of_folder(tmp_path / "dv" / "testset_000300", truth)
    white = float(np.mean([-10 * np.log10(np.mean((1 - t) ** 2)) for t in truth]))
    # Measured, these settings, DeepVoxels minus Blender: seed 0 (this test) +0.48 dB (22.71 vs 22.24), seeds 2, 3,
    # 4: -0.83, -0.08, -1.17 (the two layouts sample different depths, so each seed's run differs). 2 dB: 1.7x the
    # largest; the all-white render scores ~9.9 dB, a loader's wrong camera far less than the Blender run.
    assert abs(dv_psnr - blender_psnr) < 2.0, (dv_psnr, blender_psnr)
    assert dv_psnr > white + 5, (dv_psnr, white)
