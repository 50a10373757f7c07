"""rendering: coarse sampling, hierarchical resampling, compositing, chunking.

Closed forms (homogeneous media), a float64 NumPy twin of the compositing,
and networks that record what they are asked stand in for expected numbers.
"""
import numpy as np
import pytest
import torch

from nerf import rendering
from run_nerf_helpers import NeRF, get_embedder, get_rays, ndc_rays


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: on a shared, busy CPU the intra-op thread pool
    only adds synchronisation (measured 40 s -> 6 s for this file with
    test_reference). Restored afterwards for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_close(got, want, rtol=0.0, atol=0.0):
    # numpy's comparison: torch.testing.assert_close imports torch.distributed (~2 s) on first use
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=rtol, atol=atol)


def ray_batch(rays_o, rays_d, near, far, viewdirs=None):
    n = rays_o.shape[0]
    cols = [rays_o, rays_d, torch.full((n, 1), float(near)), torch.full((n, 1), float(far))]
    if viewdirs is not None:
        cols.append(viewdirs)
    return torch.cat(cols, -1)


def random_rays(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rays_o = torch.randn(n, 3, generator=g) * 0.3
    rays_d = torch.randn(n, 3, generator=g)
    rays_d = scale * rays_d / torch.norm(rays_d, dim=-1, keepdim=True)
    return rays_o, rays_d


def depth_along(pts, rays_o, rays_d):
    """z such that pts = o + z d, for points (N, S, 3) on rays (N, 3)."""
    return torch.sum((pts - rays_o[:, None]) * rays_d[:, None], -1) / torch.sum(rays_d ** 2, -1)[:, None]


class Recorder:
    """A network_query_fn that logs the points, view directions and network it is given."""

    def __init__(self, field):
        self.field, self.calls = field, []

    def __call__(self, pts, viewdirs, fn):
        self.calls.append((pts.detach().clone(), None if viewdirs is None else viewdirs.clone(), fn))
        return self.field(pts)


def bump_field(pts):
    """A smooth, non-trivial density and colour: a Gaussian blob of density 8."""
    sigma = 8.0 * torch.exp(-torch.sum((pts - torch.tensor([0.1, -0.2, -3.0])) ** 2, -1))
    return torch.cat([torch.sin(3 * pts), sigma[..., None]], -1)


# --- Coarse sampling ---------------------------------------------------------

def test_coarse_depths_linear_lindisp_and_perturbed():
    near = torch.tensor([[2.0], [0.5]], dtype=torch.float64)
    far = torch.tensor([[6.0], [4.0]], dtype=torch.float64)
    t = np.linspace(0, 1, 9)
    z = rendering.sample_along_rays(near, far, 9).numpy()
    np.testing.assert_allclose(z, near.numpy() * (1 - t) + far.numpy() * t, rtol=0, atol=1e-12)

    zl = rendering.sample_along_rays(near, far, 9, lindisp=True).numpy()
    np.testing.assert_allclose(1 / zl, (1 - t) / near.numpy() + t / far.numpy(), rtol=1e-12)

    torch.manual_seed(0)
    zp = rendering.sample_along_rays(near, far, 9, perturb=1.0).numpy()
    mids = 0.5 * (z[:, 1:] + z[:, :-1])
    lower = np.concatenate([z[:, :1], mids], 1)
    upper = np.concatenate([mids, z[:, -1:]], 1)
    assert np.all((zp >= lower) & (zp <= upper))
    assert np.abs(zp - z).max() > 1e-3


# --- Hierarchical sampling inside render_rays ----------------------------------

@pytest.mark.parametrize("perturb", [0.0, 1.0])
def test_fine_samples_are_merged_sorted_and_seen_by_the_fine_network(perturb):
    torch.manual_seed(1)
    N_samples, N_importance = 16, 24
    rays_o, rays_d = random_rays(10, seed=2, scale=1.3)
    rays_o = rays_o + torch.tensor([0.0, 0.0, 1.0])
    rays_d[:, 2] = -rays_d[:, 2].abs()             # look towards the blob at z = -3
    coarse_net, fine_net = object(), object()
    rec = Recorder(bump_field)
    ret = rendering.render_rays(ray_batch(rays_o, rays_d, 1.0, 6.0), network_fn=coarse_net,
                                network_query_fn=rec, N_samples=N_samples, retraw=True,
                                perturb=perturb, N_importance=N_importance, network_fine=fine_net)

    assert len(rec.calls) == 2
    (pts_c, _, net_c), (pts_f, _, net_f) = rec.calls
    assert net_c is coarse_net and net_f is fine_net
    assert pts_c.shape == (10, N_samples, 3)
    assert pts_f.shape == (10, N_samples + N_importance, 3)
    assert ret["raw"].shape == (10, N_samples + N_importance, 4)

    z_c = depth_along(pts_c, rays_o, rays_d)
    z_f = depth_along(pts_f, rays_o, rays_d)
    assert torch.all(torch.diff(z_f, dim=-1) >= -1e-5)
    assert torch.all((z_f >= 1.0 - 1e-5) & (z_f <= 6.0 + 1e-5))
    for r in range(10):
        fine = z_f[r].numpy().tolist()
        for z in z_c[r].numpy():                  # every coarse depth is kept
            k = int(np.argmin(np.abs(np.array(fine) - z)))
            assert abs(fine[k] - z) < 1e-5
            fine.pop(k)
        # What is left are the N_importance new samples; z_std is their population std.
        assert len(fine) == N_importance
        assert ret["z_std"][r].item() == pytest.approx(np.std(fine), abs=1e-4)

    # The raw output returned is the fine pass's, and the maps are composited from it.
    np.testing.assert_allclose(ret["raw"].numpy(), bump_field(pts_f).numpy(), rtol=0, atol=1e-5)
    rgb, disp, acc, _, _ = rendering.raw2outputs(ret["raw"], z_f, rays_d)
    np.testing.assert_allclose(ret["rgb_map"].numpy(), rgb.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ret["acc_map"].numpy(), acc.numpy(), rtol=0, atol=1e-4)
    for key in ("rgb0", "disp0", "acc0"):
        assert key in ret and ret[key].shape[0] == 10


def test_fine_samples_follow_the_coarse_weights():
    """A thin dense slab: most importance samples land inside it."""
    def slab(pts):
        z = -pts[..., 2]
        sigma = torch.where((z > 3.0) & (z < 3.2), torch.full_like(z, 50.0), torch.zeros_like(z))
        return torch.cat([torch.zeros_like(pts), sigma[..., None]], -1)
    rays_o = torch.zeros(4, 3)
    rays_d = torch.tensor([[0.0, 0.0, -1.0]]).repeat(4, 1)
    rec = Recorder(slab)
    rendering.render_rays(ray_batch(rays_o, rays_d, 2.0, 6.0), network_fn=None, network_query_fn=rec,
                          N_samples=64, N_importance=64, perturb=0.0)
    z_c, z_f = -rec.calls[0][0][..., 2], -rec.calls[1][0][..., 2]
    near_slab = lambda z: ((z > 2.9) & (z < 3.3)).sum(-1)
    # Of the 64 new samples only the two with u = 0 and u = 1 (det) may fall
    # outside the bins next to the slab.
    assert torch.all(near_slab(z_f) - near_slab(z_c) >= 62)


def test_coarse_network_reused_without_fine_network():
    rays_o, rays_d = random_rays(3, seed=3)
    net = object()
    rec = Recorder(bump_field)
    ret = rendering.render_rays(ray_batch(rays_o, rays_d, 0.5, 4.0), network_fn=net, network_query_fn=rec,
                                N_samples=8, N_importance=8, network_fine=None)
    assert [c[2] for c in rec.calls] == [net, net]
    assert set(ret) == {"rgb_map", "disp_map", "acc_map", "rgb0", "disp0", "acc0", "z_std"}


# --- Compositing -------------------------------------------------------------

def numpy_raw2outputs(raw, z_vals, rays_d, white_bkgd):
    """Float64 twin of SPEC section 4 (with disparity 0 where no weight)."""
    raw, z_vals, rays_d = (np.asarray(a, dtype=np.float64) for a in (raw, z_vals, rays_d))
    dists = np.concatenate([np.diff(z_vals, axis=-1), np.full(z_vals[..., :1].shape, 1e10)], -1)
    dists = dists * np.linalg.norm(rays_d, axis=-1)[..., None]
    rgb = 1 / (1 + np.exp(-raw[..., :3]))
    alpha = 1 - np.exp(-np.maximum(raw[..., 3], 0) * dists)
    trans = np.ones_like(alpha)
    for i in range(1, alpha.shape[-1]):
        trans[..., i] = trans[..., i - 1] * (1 - alpha[..., i - 1] + 1e-10)
    w = alpha * trans
    acc = w.sum(-1)
    depth = (w * z_vals).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.where(acc > 0, 1 / np.maximum(1e-10, depth / acc), 0.0)
    rgb_map = (w[..., None] * rgb).sum(-2) + ((1 - acc)[..., None] if white_bkgd else 0)
    return rgb_map, disp, acc, w, depth


@pytest.mark.parametrize("white_bkgd", [False, True])
def test_raw2outputs_matches_numpy_twin(white_bkgd):
    g = torch.Generator().manual_seed(4)
    N, S = 32, 20
    raw = torch.randn(N, S, 4, generator=g) * 2
    raw[:4, :, 3] = -1.0                           # four empty rays
    z_vals, _ = torch.sort(torch.rand(N, S, generator=g) * 4 + 2, -1)
    rays_d = torch.randn(N, 3, generator=g)
    got = rendering.raw2outputs(raw, z_vals, rays_d, white_bkgd=white_bkgd)
    want = numpy_raw2outputs(raw, z_vals, rays_d, white_bkgd)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_.numpy(), w_, rtol=1e-4, atol=1e-5)


def medium_field(rays_o, rays_d, sigma, logit, far_exclusive):
    """Constant density `sigma` and colour sigmoid(logit); with `far_exclusive`
    the density is 0 from depth `far_exclusive` on (the last sample)."""
    def field(pts):
        z = depth_along(pts, rays_o, rays_d)
        s = torch.full_like(z, sigma)
        if far_exclusive is not None:
            s = torch.where(z < far_exclusive, s, torch.zeros_like(s))
        return torch.cat([torch.full(pts.shape, logit), s[..., None]], -1)
    return field


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.5])
def test_homogeneous_medium_gives_beer_lambert(sigma):
    near, far, S = 2.0, 6.0, 256
    rays_o, rays_d = random_rays(6, seed=5, scale=1.0)
    rays_d = rays_d * torch.linspace(0.5, 1.5, 6)[:, None]    # |d| != 1 scales the optical depth
    step = (far - near) / (S - 1)
    field = medium_field(rays_o, rays_d, sigma, logit=0.4, far_exclusive=far - step / 2)
    ret = rendering.render_rays(ray_batch(rays_o, rays_d, near, far), network_fn=None,
                                network_query_fn=lambda p, v, fn: field(p), N_samples=S)
    length = (far - near) * torch.norm(rays_d, dim=-1)
    acc_want = 1 - torch.exp(-sigma * length)
    np.testing.assert_allclose(ret["acc_map"].numpy(), acc_want.numpy(), rtol=0, atol=1e-3)
    colour = 1 / (1 + np.exp(-0.4))
    np.testing.assert_allclose(ret["rgb_map"].numpy(), (acc_want[:, None] * colour).expand(6, 3).numpy(),
                               rtol=0, atol=1e-3)
    # Mean depth of the truncated exponential; the discrete sum puts each
    # interval's weight at its start, so it may be off by one step at most.
    lam = sigma * torch.norm(rays_d, dim=-1).double()
    L = far - near
    mean_depth = near + 1 / lam - L * torch.exp(-lam * L) / (1 - torch.exp(-lam * L))
    got_depth = 1 / ret["disp_map"].double()
    assert torch.all((got_depth - mean_depth).abs() < step)


def test_density_at_the_last_sample_absorbs_everything():
    """The last interval is 1e10 long: any density there makes the ray opaque."""
    rays_o, rays_d = random_rays(5, seed=6)
    field = medium_field(rays_o, rays_d, 0.2, logit=-1.0, far_exclusive=None)
    ret = rendering.render_rays(ray_batch(rays_o, rays_d, 2.0, 6.0), network_fn=None,
                                network_query_fn=lambda p, v, fn: field(p), N_samples=64)
    np.testing.assert_allclose(ret["acc_map"].numpy(), 1.0, rtol=0, atol=1e-6)


def test_white_background():
    rays_o, rays_d = random_rays(4, seed=7)
    empty = lambda p, v, fn: torch.cat([torch.randn(p.shape), torch.full(p.shape[:-1] + (1,), -2.0)], -1)
    ret = rendering.render_rays(ray_batch(rays_o, rays_d, 2.0, 6.0), network_fn=None,
                                network_query_fn=empty, N_samples=16, white_bkgd=True)
    assert torch.all(ret["acc_map"] == 0)
    assert torch.all(ret["rgb_map"] == 1.0)

    g = torch.Generator().manual_seed(8)
    raw = torch.randn(12, 10, 4, generator=g)
    raw[:, -1, 3] = -1.0                           # keep the 1e10-long last interval clear
    z_vals, _ = torch.sort(torch.rand(12, 10, generator=g) * 4 + 2, -1)
    d = torch.randn(12, 3, generator=g)
    black = rendering.raw2outputs(raw, z_vals, d, white_bkgd=False)
    white = rendering.raw2outputs(raw, z_vals, d, white_bkgd=True)
    assert black[2].max() < 1 and black[2].max() > 0.1
    assert_close(white[0], black[0] + (1 - black[2])[:, None], atol=1e-7)
    for a, b in zip(black[1:], white[1:]):
        assert torch.equal(a, b)


def test_disparity_is_zero_not_nan_without_weight():
    """SPEC improvement: the original's disp is 0/0 = NaN on empty rays."""
    raw = torch.randn(6, 12, 4)
    raw[:3, :, 3] = -torch.rand(3, 12) - 0.1      # rays 0-2: no density anywhere
    raw[3:, :, 3] = torch.rand(3, 12) + 0.5
    z_vals = torch.linspace(2, 6, 12).expand(6, 12)
    rays_d = torch.randn(6, 3)
    rgb, disp, acc, weights, depth = rendering.raw2outputs(raw, z_vals, rays_d)
    assert torch.all(weights[:3] == 0) and torch.all(acc[:3] == 0)
    assert torch.all(torch.isfinite(disp))
    assert torch.all(disp[:3] == 0)
    assert_close(disp[3:], acc[3:] / depth[3:], rtol=1e-6)
    assert torch.all(rgb[:3] == 0)


def test_raw_noise_only_when_asked():
    raw = torch.randn(5, 8, 4)
    z_vals = torch.linspace(2, 6, 8).expand(5, 8)
    d = torch.randn(5, 3)
    torch.manual_seed(0)
    a = rendering.raw2outputs(raw, z_vals, d, raw_noise_std=0.0)
    torch.manual_seed(1)
    b = rendering.raw2outputs(raw, z_vals, d, raw_noise_std=0.0)
    c = rendering.raw2outputs(raw, z_vals, d, raw_noise_std=1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[3], c[3])


# --- Full images: view directions, chunking -----------------------------------

def small_scene(netchunk, dtype=torch.float32):
    torch.manual_seed(9)
    mk = lambda: NeRF(D=3, W=32, input_ch=63, input_ch_views=27, output_ch=5, skips=[1], use_viewdirs=True)
    coarse, fine = mk().to(dtype), mk().to(dtype)
    embed, _ = get_embedder(10)
    embeddirs, _ = get_embedder(4)
    query = lambda pts, viewdirs, fn: rendering.run_network(pts, viewdirs, fn, embed, embeddirs, netchunk=netchunk)
    return dict(network_fn=coarse, network_fine=fine, network_query_fn=query)


@pytest.mark.parametrize("ndc, near, far", [(True, 0.0, 1.0), (False, 2.0, 6.0)])
def test_chunk_and_netchunk_never_change_outputs(ndc, near, far):
    """In float64, so that the few-ulp differences of float32 matrix products
    over batches of different sizes (BLAS picks other kernels) cannot hide or
    fake a difference: any chunking mistake shows up far above 1e-6."""
    H, W, focal = 5, 9, 7.0
    K = np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    c2w = torch.tensor([[0.96, -0.28, 0.0, 0.1], [0.28, 0.96, 0.0, -0.2], [0.0, 0.0, 1.0, 0.3]],
                       dtype=torch.float64)
    common = dict(c2w=c2w, ndc=ndc, near=near, far=far, use_viewdirs=True, N_samples=8, N_importance=8,
                  perturb=0.0, raw_noise_std=0.0, retraw=True)
    with torch.no_grad():
        small = rendering.render(H, W, K, chunk=7, **common, **small_scene(13, torch.float64))
        large = rendering.render(H, W, K, chunk=1024 * 32, **common, **small_scene(1024 * 64, torch.float64))
    assert small[0].dtype == torch.float64
    for a, b in zip(small[:3], large[:3]):
        assert a.shape[:2] == (H, W)
        assert_close(a, b, atol=1e-6)
    assert set(small[3]) == {"rgb0", "disp0", "acc0", "z_std", "raw"}
    for key in small[3]:
        assert small[3][key].shape[:2] == (H, W)
        assert_close(small[3][key], large[3][key], atol=1e-6)


def test_viewdirs_are_normalised_world_directions_taken_before_ndc():
    H, W, focal = 4, 6, 5.0
    K = np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    c2w = torch.tensor([[1.0, 0.0, 0.0, 0.2], [0.0, 0.8, -0.6, 0.1], [0.0, 0.6, 0.8, -0.1]])
    static = torch.tensor([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0]])
    rec = Recorder(lambda p: torch.zeros(p.shape[:-1] + (4,)))
    rendering.render(H, W, K, c2w=c2w, c2w_staticcam=static, ndc=True, near=0.0, far=1.0, use_viewdirs=True,
                     network_fn=None, network_query_fn=rec, N_samples=4)
    pts, viewdirs, _ = rec.calls[0]
    _, d_world = get_rays(H, W, K, c2w)
    want = (d_world / torch.norm(d_world, dim=-1, keepdim=True)).reshape(-1, 3)
    assert_close(viewdirs, want, atol=1e-6)
    # The points lie on the static camera's rays, in NDC: the first sample (t = near = 0)
    # is the NDC origin, at z' = -1, the last (t = far = 1) is o' + d'.
    o_s, d_s = get_rays(H, W, K, static)
    o_ndc, d_ndc = ndc_rays(H, W, focal, 1.0, o_s, d_s)
    assert_close(pts[:, 0], o_ndc.reshape(-1, 3), atol=1e-6)
    assert_close(pts[:, -1], (o_ndc + d_ndc).reshape(-1, 3), atol=1e-6)
    assert torch.allclose(pts[:, 0, 2], torch.tensor(-1.0))


def test_render_path_frames_with_the_originals_three_argument_query():
    """render_path asks a density-only coarse pass of the library's query
    function; an original-style network_query_fn (inputs, viewdirs, fn), as
    forks pass, gets the full coarse pass instead, and the frames agree."""
    H, W, focal = 6, 8, 7.0
    K = np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    poses = np.stack([np.eye(4)[:3], np.array([[0.96, -0.28, 0.0, 0.1], [0.28, 0.96, 0.0, -0.2],
                                               [0.0, 0.0, 1.0, 0.3]])]).astype(np.float32)
    scene = small_scene(1024)
    embed, _ = get_embedder(10)
    embeddirs, _ = get_embedder(4)
    library_query = rendering.make_network_query_fn(embed, embeddirs, 1024)
    assert rendering.accepts_density_only(library_query)
    assert not rendering.accepts_density_only(scene["network_query_fn"])
    common = dict(network_fn=scene["network_fn"], network_fine=scene["network_fine"], ndc=False, near=2.0, far=6.0,
                  use_viewdirs=True, N_samples=8, N_importance=8, perturb=0.0, raw_noise_std=0.0)
    original = rendering.render_path(poses, (H, W, focal), K, 1024, dict(common, **scene))
    lean = rendering.render_path(poses, (H, W, focal), K, 1024, dict(common, network_query_fn=library_query))
    for a, b in zip(original, lean):
        assert a.shape[:3] == (2, H, W)
        np.testing.assert_array_equal(a, b)


def test_median_termination_by_hand():
    """Samples at z = 1, 2, 3, 4; the accumulated opacity reaches c_i at z_i and
    is linear in between. Ray a: w = (0, 0.75, 0.125, 0.125), A = 1: half is
    reached between z = 1 (c = 0) and z = 2 (c = 0.75) at 1 + 0.5 / 0.75.
    Ray b: w = (0.1, 0.1, 0.2, 0), A = 0.4, half 0.2 at z = 2 exactly. Ray c:
    w = (0.2, 0, 0, 0): the first sample already holds half: z_0. Ray d: no
    weight at all: z_0. Ray e: all of it at the last sample, reached from
    z = 3: 3 + 0.45 / 0.9 = 3.5."""
    z = torch.tensor([[1.0, 2, 3, 4]] * 5)
    weights = torch.tensor([[0, 0.75, 0.125, 0.125], [0.1, 0.1, 0.2, 0], [0.2, 0, 0, 0], [0, 0, 0, 0],
                            [0, 0, 0, 0.9]])
    t = rendering.median_termination(weights, z)
    expected = torch.tensor([1 + 0.5 / 0.75, 2.0, 1.0, 1.0, 3.5], dtype=torch.float32)
    assert torch.allclose(t, expected, rtol=0, atol=1e-6), t


@pytest.mark.parametrize("sigma", [2.0, 13.0, 100.0])
def test_median_termination_of_a_uniform_slab_is_ln2_over_sigma_past_its_start(sigma):
    """A density sigma from t0 on and 0 before, t0 anywhere between two samples:
    the opacity reaches half of its final value ln 2 / sigma past t0
    (1 - exp(-sigma s) = 1/2). The interpolated median is within one sample
    spacing of it, and converges to it as the samples get denser. Weights from
    compositing_weights at the samples, as in a render; 8 rays of random spacing."""
    t0 = 3.0 + torch.rand(8, 1, generator=torch.Generator().manual_seed(2)) * 0.5 / sigma
    for spacing_sigma, bound in ((0.5, 0.5), (0.05, 0.05)):   # spacing up to this / sigma
        spacing = torch.rand(8, 600, generator=torch.Generator().manual_seed(1)) * spacing_sigma / sigma
        z = 3.0 - 1 / sigma + torch.cumsum(spacing, -1)
        density = torch.where(z >= t0, torch.full_like(z, sigma), torch.zeros_like(z))
        weights = rendering.compositing_weights(density, z, torch.tensor([[0.0, 0.0, 1.0]] * 8))
        assert float(weights.sum(-1).min()) > 0.99
        t = rendering.median_termination(weights, z)
        error = (t - (t0[:, 0] + np.log(2) / sigma)).abs().max()
        assert error < bound / sigma, (error, bound / sigma)
