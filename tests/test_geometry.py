"""Meshes, depth maps and point clouds against exact geometry.

A trained network is too slow for most of these, so an analytic field stands
in for NeRF: its density rises linearly from 0 to SIGMA0 across a layer of
width `edge` centred on the demo scene's exact surfaces (SIGMA0 / 2 on them)
and its colour is the solid's albedo. The render and mesh code cannot tell
it from a network. A sharp layer renders like a trained opaque surface; a
wide one is smooth enough on the lattice for marching cubes to be exact.
"""
import sys

import numpy as np
import pytest
import torch

from nerf import demo_scene, geometry
import extract_mesh
from nerf.datasets import Scene
from nerf.errors import DataError
from nerf.rendering import render_path
from run_nerf_helpers import ndc_rays

trimesh = pytest.importorskip("trimesh", reason="mesh extraction needs requirements-mesh.txt")
from skimage import measure  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

SIGMA0 = 400.0
SHARP, SMOOTH = 0.004, 0.1    # widths of the density's rise across a surface (world units)
H = W = 24


class AnalyticField(torch.nn.Module):
    """raw = [logit(albedo), sigma]: sigma = SIGMA0 clip(1/2 - sdf / edge, 0, 1) from the
    exact signed distance of `solids`; points (..., 3) in render space, mapped to world
    coordinates by `to_world` first (NDC scenes)."""

    def __init__(self, solids=demo_scene.SCENE, to_world=lambda p: p, edge=SHARP):
        super().__init__()
        self.solids, self.to_world, self.edge = solids, to_world, edge

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        world = self.to_world(pts.double()).cpu().numpy()
        sdf, idx = demo_scene.signed_distance(world, self.solids)
        albedo = np.array([s.albedo for s in self.solids])[idx]
        raw = np.concatenate([np.log(albedo / (1 - albedo)),
                              SIGMA0 * np.clip(0.5 - sdf / self.edge, 0, 1)[..., None]], -1)
        return torch.as_tensor(raw, dtype=torch.float32, device=pts.device)


def query(inputs, viewdirs, network_fn, density_only=False):
    raw = network_fn(inputs)
    return raw[..., 3:4] if density_only else raw


def kwargs_for(field, ndc: bool, near: float, far: float) -> dict:
    return {"network_query_fn": query, "network_fn": field, "network_fine": field, "N_samples": 32,
            "N_importance": 32, "perturb": 0.0, "raw_noise_std": 0.0, "white_bkgd": True,
            "use_viewdirs": True, "ndc": ndc, "near": near, "far": far}


def make_scene(poses, focal, near, far) -> Scene:
    poses = np.asarray(poses, dtype=np.float32)[:, :3, :4]
    n = len(poses)
    K = np.array([[focal, 0, 0.5 * W], [0, focal, 0.5 * H], [0, 0, 1]])
    return Scene(images=np.zeros((n, H, W, 3), np.float32), poses=poses, render_poses=poses, H=H, W=W,
                 focal=focal, K=K, i_train=np.arange(n - 2), i_val=np.arange(n - 2, n), i_test=np.arange(n - 2, n),
                 near=near, far=far)


@pytest.fixture(scope="module")
def demo():
    """The demo scene's cameras (Blender convention, no NDC) and its sharp analytic field."""
    poses = demo_scene.hemisphere_poses(14, np.random.default_rng(3))
    scene = make_scene(poses, demo_scene.focal_from_angle(W, demo_scene.CAMERA_ANGLE_X), 2.0, 6.0)
    return scene, kwargs_for(AnalyticField(), ndc=False, near=2.0, far=6.0)


def completeness(mesh, scene: Scene, solids=demo_scene.SCENE, distance: float = 0.05) -> float:
    """Fraction of the surface points the scene's cameras see (their pixels' exact hits)
    within `distance` of a mesh vertex."""
    seen = []
    for c2w in scene.poses:
        rays_o, rays_d = demo_scene.pixel_rays(H, W, scene.focal, c2w)
        t, _, hit = demo_scene.cast_rays(rays_o, rays_d, solids)
        seen.append((rays_o + np.where(hit >= 0, t, 0)[..., None] * rays_d)[hit >= 0])
    gap, _ = cKDTree(mesh.vertices).query(np.concatenate(seen))
    return float(np.mean(gap < distance))


# Forward-facing: cameras near the origin looking down -z, a ball and a box in front.
FRONT = (demo_scene.Sphere(center=(0.4, -0.3, -3.5), radius=0.7, albedo=(0.9, 0.1, 0.1)),
         demo_scene.Box(center=(-0.6, 0.5, -5.0), half=(0.5, 0.4, 0.5), albedo=(0.1, 0.8, 0.15)))


@pytest.fixture(scope="module")
def front():
    rng = np.random.default_rng(4)
    poses = []
    for _ in range(8):
        c2w = demo_scene.look_at(rng.uniform(-0.15, 0.15, 3), target=(0.0, 0.0, -4.0), up=(0.0, 1.0, 0.0))
        poses.append(c2w)
    scene = make_scene(poses, 30.0, 0.0, 1.0)
    hwf = scene.hwf
    field = AnalyticField(FRONT, to_world=lambda p: geometry.ndc_to_world(p, H, W, hwf[2]))
    # NDC samples are evenly spaced in 1/z: 128 of them resolve a surface at z = -5 to ~0.08.
    return scene, dict(kwargs_for(field, ndc=True, near=0.0, far=1.0), N_samples=128, N_importance=128)


def test_ndc_round_trip_and_agreement_with_ndc_rays():
    rng = np.random.default_rng(0)
    pts = torch.as_tensor(rng.uniform([-5, -5, -30], [5, 5, -1.01], (1000, 3)))
    ndc = geometry.world_to_ndc(pts, 378, 504, 407.5)
    assert torch.allclose(geometry.ndc_to_world(ndc, 378, 504, 407.5), pts, rtol=1e-12, atol=1e-12)

    # Points along an NDC ray go back to the world ray they came from, beyond z = -1.
    rays_o = torch.as_tensor(rng.uniform(-0.3, 0.3, (200, 3)))
    rays_d = torch.as_tensor(rng.uniform([-0.5, -0.5, -1.0], [0.5, 0.5, -0.8], (200, 3)))
    o_ndc, d_ndc = ndc_rays(378, 504, 407.5, 1.0, rays_o, rays_d)
    t = torch.as_tensor(rng.uniform(0.0, 0.99, (200, 1)))
    world = geometry.ndc_to_world(o_ndc + t * d_ndc, 378, 504, 407.5)
    offset = world - rays_o
    assert torch.allclose(torch.cross(offset, rays_d, dim=-1), torch.zeros_like(offset), atol=1e-9)
    assert torch.all(torch.sum(offset * rays_d, -1) > 0) and torch.all(world[:, 2] <= -1.0 + 1e-9)


def test_grid_keeps_the_cell_size_on_every_axis():
    axes, h = geometry.grid_axes(np.array([-1.0, 0.0, 2.0]), np.array([1.0, 0.5, 3.0]), 40)
    assert h == pytest.approx(0.05)
    assert [len(a) for a in axes] == [41, 11, 21]
    assert axes[0][-1] == pytest.approx(1.0) and axes[1][-1] == pytest.approx(0.5) and axes[2][0] == 2.0


def test_default_box_is_where_every_camera_looks(demo):
    scene, kwargs = demo
    lo, hi = extract_mesh.default_bbox(scene, False, torch.zeros(0, 3))
    assert np.all(lo < -demo_scene.SCENE_RADIUS) and np.all(hi > demo_scene.SCENE_RADIUS)
    assert np.all(lo > -2.0) and np.all(hi < 2.0)   # cameras at radius 4, near 2, 40 degree view


def test_mesh_of_the_demo_solids_lands_on_their_surfaces(demo):
    """Axis order, world units, orientation and vertex colours: on a field smooth at the
    lattice's scale, the level SIGMA0 / 2 is the exact surface."""
    scene, _ = demo
    kwargs = kwargs_for(AnalyticField(edge=SMOOTH), ndc=False, near=2.0, far=6.0)
    lo, hi = extract_mesh.default_bbox(scene, False, torch.zeros(0, 3))
    mesh = extract_mesh.extract_mesh(trimesh, measure, scene, kwargs, False, lo, hi, SIGMA0 / 2, 64, False,
                                     65536, 4096, "cpu")
    h = float(np.max(hi - lo)) / 64
    sdf, idx = demo_scene.signed_distance(mesh.vertices)
    assert np.mean(np.abs(sdf)) < 0.03 * h and np.max(np.abs(sdf)) < 0.5 * h   # corners get rounded
    # Closed, outward-wound surfaces: the enclosed volume is the solids' own.
    exact = sum(4 / 3 * np.pi * s.radius ** 3 if isinstance(s, demo_scene.Sphere) else
                8 * np.prod(s.half) if isinstance(s, demo_scene.Box) else
                np.pi * s.radius ** 2 * (s.z_max - s.z_min) for s in demo_scene.SCENE)
    assert mesh.volume == pytest.approx(exact, rel=0.02)
    assert completeness(mesh, scene, distance=h) > 0.99
    # Colours: away from the other solids (a colour ray is 8 cells long), each its solid's albedo.
    others = np.array([[demo_scene.signed_distance(v[None], [s for k, s in enumerate(demo_scene.SCENE)
                                                             if k != i])[0][0]] for v, i in zip(mesh.vertices, idx)])
    alone = others[:, 0] > 5 * h
    albedo = np.array([s.albedo for s in demo_scene.SCENE])[idx]
    colours = mesh.visual.vertex_colors[:, :3] / 255.0
    assert alone.mean() > 0.4 and set(idx[alone]) == {0, 1, 2, 3}
    assert np.mean(np.all(np.abs(colours - albedo)[alone] < 0.05, -1)) > 0.98


def test_default_level_finds_sharp_surfaces(demo):
    """Sharp surfaces, as a trained NeRF's: the default level lies between the densities
    outside and inside, and the mesh is as close to the surface as the lattice allows
    (a vertex sits between a sample outside and one inside: within h / 2)."""
    scene, kwargs = demo
    probe, _ = extract_mesh.render_surface(scene, scene.poses[scene.i_train], kwargs, False, 3, 4096, "cpu")
    level = extract_mesh.default_threshold(probe, kwargs, 65536)
    assert 0.3 * SIGMA0 < level < 0.7 * SIGMA0
    lo, hi = extract_mesh.default_bbox(scene, False, probe)
    mesh = extract_mesh.extract_mesh(trimesh, measure, scene, kwargs, False, lo, hi, level, 48, False,
                                     65536, 4096, "cpu")
    h = float(np.max(hi - lo)) / 48
    sdf, _ = demo_scene.signed_distance(mesh.vertices)
    assert np.mean(np.abs(sdf)) < 0.3 * h and np.max(np.abs(sdf)) < 0.55 * h


def test_depth_maps_match_the_exact_depth(demo, tmp_path):
    scene, kwargs = demo
    poses = scene.poses[scene.i_test]
    _, _, depths = render_path(torch.as_tensor(poses), scene.hwf, scene.K, 4096, kwargs, with_depth=True)
    assert depths.dtype == np.float32 and depths.shape == (2, H, W)
    for depth, c2w in zip(depths, poses):
        t, _, idx = demo_scene.cast_rays(*demo_scene.pixel_rays(H, W, scene.focal, c2w))
        hit = idx >= 0
        assert np.mean(np.isnan(depth) == ~hit) > 0.97
        both = hit & ~np.isnan(depth)
        assert np.median(np.abs(depth[both] - t[both])) < 0.01


def test_ndc_depth_mesh_and_point_cloud_are_in_world_coordinates(front):
    scene, kwargs = front
    poses = scene.poses[scene.i_test]
    _, _, depths = render_path(torch.as_tensor(poses), scene.hwf, scene.K, 4096, kwargs, with_depth=True)
    for depth, c2w in zip(depths, poses):
        t, _, idx = demo_scene.cast_rays(*demo_scene.pixel_rays(H, W, scene.focal, c2w), FRONT)
        both = (idx >= 0) & ~np.isnan(depth)
        assert both.sum() > 0.2 * H * W
        assert np.median(np.abs(depth[both] - t[both]) / t[both]) < 0.015

    pts, colours = extract_mesh.render_surface(scene, scene.poses[scene.i_train], kwargs, True, 2, 4096, "cpu")
    world = geometry.to_world(pts.double(), True, scene.hwf).numpy()
    sdf, idx = demo_scene.signed_distance(world, FRONT)
    assert np.median(np.abs(sdf)) < 0.02
    assert np.mean(np.all(np.abs(colours.numpy() - np.array([s.albedo for s in FRONT])[idx]) < 0.1, -1)) > 0.9

    lo, hi = extract_mesh.default_bbox(scene, True, pts)
    mesh = extract_mesh.extract_mesh(trimesh, measure, scene, kwargs, True, lo, hi, SIGMA0 / 2, 48, True,
                                     65536, 4096, "cpu")
    sdf, idx = demo_scene.signed_distance(mesh.vertices, FRONT)
    assert np.all(idx == 0)                              # the largest piece: the ball
    assert np.mean(np.abs(sdf)) < 0.05                   # NDC cells here are ~0.06 x 0.06 x 0.25 in world
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.7 ** 3, rel=0.05)


def test_missing_mesh_libraries_name_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "trimesh", None)     # makes `import trimesh` fail
    with pytest.raises(DataError) as err:
        extract_mesh.import_mesh_libraries()
    assert err.value.where == "requirements-mesh.txt" and "trimesh" in err.value.what


class SoftField(torch.nn.Module):
    """A trained demo network's geometry: density `sigma` inside the solids (a step
    at the exact surface), 0 outside, and the solids' albedo."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def density(self, pts: np.ndarray) -> np.ndarray:
        return self.sigma * (demo_scene.signed_distance(pts)[0] < 0)

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        world = pts.double().cpu().numpy()
        albedo = np.array([s.albedo for s in demo_scene.SCENE])[demo_scene.signed_distance(world)[1]]
        raw = np.concatenate([np.log(albedo / (1 - albedo)), self.density(world)[..., None]], -1)
        return torch.as_tensor(raw, dtype=torch.float32, device=pts.device)


def dense_termination(field: SoftField, o: np.ndarray, d: np.ndarray, near: float, far: float, n: int = 4000):
    """Each ray's (..., 3) median and mean termination depth, integrated in float64 on
    n steps: opacity O(t) = 1 - exp(-integral sigma |d| dt); the median is where O
    first reaches O(far) / 2, the mean integral t dO / O(far)."""
    dt = (far - near) / n
    t = near + dt * (np.arange(n) + 0.5)
    sigma = field.density(o[..., None, :] + t[:, None] * d[..., None, :])
    opacity = 1 - np.exp(-np.cumsum(sigma * np.linalg.norm(d, axis=-1)[..., None] * dt, -1))
    final = opacity[..., -1:]
    median = near + dt * np.argmax(opacity >= final / 2, -1)
    gained = np.diff(opacity, prepend=0, axis=-1)
    mean = np.sum(gained * (t - dt / 2), -1) / np.maximum(final[..., 0], 1e-12)
    return median, mean


def test_depth_maps_are_the_median_termination_depth_and_mean_on_request(demo):
    """The default depth map is where each ray's opacity reaches half its final
    value, depth_estimator="mean" the weighted mean depth, both against a float64
    integration along the pixel rays of a soft solid (density 13 inside, as the
    trained demo's network has), and the median lies closer to the exact surface.
    Both estimators are off the integration by the render's sampling (32 + 32
    samples over 4 units across a density step): at the median pixel, measured,
    0.003 to 0.006 for the median, 0.005 to 0.008 for the mean."""
    scene, _ = demo
    field = SoftField(13.0)
    kwargs = kwargs_for(field, ndc=False, near=2.0, far=6.0)
    poses = scene.poses[scene.i_test]
    depths = {estimator: render_path(torch.as_tensor(poses), scene.hwf, scene.K, 4096, kwargs, with_depth=True,
                                     depth_estimator=estimator, progress=False)[2]
              for estimator in ("median", "mean")}
    for k, c2w in enumerate(poses):
        o, d = demo_scene.pixel_rays(H, W, scene.focal, c2w)
        t, _, idx = demo_scene.cast_rays(o, d)
        both = (idx >= 0) & ~np.isnan(depths["median"][k])
        assert both.sum() > 50
        median, mean = dense_termination(field, o[both], d[both], 2.0, 6.0)
        assert np.median(np.abs(depths["median"][k][both] - median)) < 0.02
        assert np.median(np.abs(depths["mean"][k][both] - mean)) < 0.02
        assert np.median(mean - median) > 0.01     # what the estimators differ by is well above that
        assert np.median(np.abs(depths["median"][k] - t)[both]) < np.median(np.abs(depths["mean"][k] - t)[both])
