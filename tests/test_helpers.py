"""run_nerf_helpers: positional encoding, the MLP, rays, NDC, hierarchical sampling, metrics.

Expected values come from independent computations (float64 NumPy twins,
closed forms, hand-set weights), not from numbers printed by the code under test.
"""
import numpy as np
import pytest
import torch

from run_nerf_helpers import (NeRF, get_embedder, get_rays, get_rays_np, img2mse, mse2psnr,
                              ndc_rays, sample_pdf, to8b)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (det +1), float64."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --- Positional encoding -----------------------------------------------------

@pytest.mark.parametrize("multires, width", [(10, 63), (4, 27)])
def test_embedding_width(multires, width):
    embed, out_dim = get_embedder(multires)
    assert out_dim == width == 3 + 3 * 2 * multires
    assert embed(torch.zeros(7, 3)).shape == (7, width)


def test_embedding_columns_are_input_then_sin_cos_per_frequency():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(11, 3))
    embed, _ = get_embedder(10)
    out = embed(torch.from_numpy(x)).numpy()          # float64 in, float64 out
    np.testing.assert_array_equal(out[:, :3], x)
    for k in range(10):
        base = 3 + 6 * k
        np.testing.assert_allclose(out[:, base:base + 3], np.sin(2.0 ** k * x), rtol=0, atol=1e-12)
        np.testing.assert_allclose(out[:, base + 3:base + 6], np.cos(2.0 ** k * x), rtol=0, atol=1e-12)


def test_embedding_float32_matches_float64_twin():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(50, 3)).astype(np.float32)
    embed, _ = get_embedder(4)
    out = embed(torch.from_numpy(x))
    assert out.dtype == torch.float32
    x64 = x.astype(np.float64)
    twin = np.concatenate([x64] + [f(2.0 ** k * x64) for k in range(4) for f in (np.sin, np.cos)], -1)
    np.testing.assert_allclose(out.numpy(), twin, rtol=0, atol=1e-5)


def test_embedding_identity_for_i_embed_minus_one():
    embed, out_dim = get_embedder(10, -1)
    assert out_dim == 3
    x = torch.randn(5, 3)
    assert torch.equal(embed(x), x)


def test_embedding_follows_input_device():
    """The helpers promise to build their tensors on the inputs' device (CUDA, MPS);
    the meta device checks that without a GPU: a CPU-only constant fails here."""
    embed, out_dim = get_embedder(10)
    out = embed(torch.zeros(4, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, out_dim)


# --- The MLP -----------------------------------------------------------------

def expected_trunk(D, W, input_ch, skips):
    shapes = {}
    for i in range(D):
        fan_in = input_ch if i == 0 else (W + input_ch if i - 1 in skips else W)
        shapes[f"pts_linears.{i}.weight"] = (W, fan_in)
        shapes[f"pts_linears.{i}.bias"] = (W,)
    return shapes


def test_state_dict_with_viewdirs():
    net = NeRF(D=8, W=256, input_ch=63, input_ch_views=27, output_ch=5, skips=[4], use_viewdirs=True)
    want = expected_trunk(8, 256, 63, [4])
    want.update({
        "views_linears.0.weight": (128, 256 + 27), "views_linears.0.bias": (128,),
        "feature_linear.weight": (256, 256), "feature_linear.bias": (256,),
        "alpha_linear.weight": (1, 256), "alpha_linear.bias": (1,),
        "rgb_linear.weight": (3, 128), "rgb_linear.bias": (3,),
    })
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == want
    assert got["pts_linears.5.weight"] == (256, 63 + 256)
    # Registration order fixes the order of parameters in the optimizer state;
    # the original registers the trunk, views_linears, then the three heads.
    assert list(got) == list(want)


def test_state_dict_without_viewdirs():
    """The original builds `views_linears` even without view directions (unused
    there), so its checkpoints and optimizer states hold it: load strictly."""
    net = NeRF(D=8, W=256, input_ch=63, input_ch_views=0, output_ch=4, skips=[4], use_viewdirs=False)
    want = expected_trunk(8, 256, 63, [4])
    want.update({
        "views_linears.0.weight": (128, 256), "views_linears.0.bias": (128,),
        "output_linear.weight": (4, 256), "output_linear.bias": (4,),
    })
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == want
    assert list(got) == list(want)
    assert net(torch.randn(6, 63)).shape == (6, 4)


def test_skip_puts_encoded_points_in_front_of_hidden_features():
    """Hand-set weights: layers 0-4 output a known constant c (bias only), layer
    5 maps [x, h] by [A | B], layers 6-7 and the head are identities. So the
    output must be relu(A x + B c): A acts on the encoded points, B on the hidden."""
    D, W, input_ch = 8, 8, 63
    net = NeRF(D=D, W=W, input_ch=input_ch, input_ch_views=0, output_ch=W, skips=[4])
    rng = np.random.default_rng(2)
    c = rng.uniform(0.5, 1.0, size=W)
    A = rng.normal(size=(W, input_ch))
    B = rng.normal(size=(W, W))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for i in range(5):
            net.pts_linears[i].bias.copy_(torch.from_numpy(c))
        net.pts_linears[5].weight.copy_(torch.from_numpy(np.concatenate([A, B], 1)))
        for i in (6, 7):
            net.pts_linears[i].weight.copy_(torch.eye(W))
        net.output_linear.weight.copy_(torch.eye(W))
    x = rng.normal(size=(9, input_ch))
    out = net(torch.from_numpy(x).float()).detach().numpy()
    want = np.maximum(x @ A.T + B @ c, 0.0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # The other concatenation order would give a clearly different answer.
    swapped = np.maximum(np.concatenate([np.broadcast_to(c, (9, W)), x], 1)[:, :input_ch] @ A.T
                         + x[:, input_ch - W:] @ B.T, 0.0)
    assert np.abs(swapped - want).max() > 0.1


def numpy_nerf_forward(state, x, D, skips, input_ch, input_ch_views, use_viewdirs):
    """Float64 twin of SPEC section 4's MLP."""
    p = {k: v.detach().double().numpy() for k, v in state.items()}
    lin = lambda name, h: h @ p[name + ".weight"].T + p[name + ".bias"]
    relu = lambda h: np.maximum(h, 0.0)
    pts, views = x[:, :input_ch], x[:, input_ch:input_ch + input_ch_views]
    h = pts
    for i in range(D):
        h = relu(lin(f"pts_linears.{i}", h))
        if i in skips:
            h = np.concatenate([pts, h], -1)
    if not use_viewdirs:
        return lin("output_linear", h)
    alpha = lin("alpha_linear", h)
    h = relu(lin("views_linears.0", np.concatenate([lin("feature_linear", h), views], -1)))
    return np.concatenate([lin("rgb_linear", h), alpha], -1)


@pytest.mark.parametrize("use_viewdirs", [True, False])
def test_forward_matches_numpy_twin(use_viewdirs):
    torch.manual_seed(3)
    input_ch, input_ch_views = 63, (27 if use_viewdirs else 0)
    net = NeRF(D=6, W=32, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5,
               skips=[2], use_viewdirs=use_viewdirs)
    x = torch.randn(40, input_ch + input_ch_views)
    out = net(x).detach().numpy()
    assert out.shape == (40, 4 if use_viewdirs else 5)
    twin = numpy_nerf_forward(net.state_dict(), x.double().numpy(), 6, [2], input_ch,
                              input_ch_views, use_viewdirs)
    np.testing.assert_allclose(out, twin, rtol=1e-4, atol=1e-5)


# --- Rays --------------------------------------------------------------------

def test_get_rays_matches_numpy_and_float64_twin():
    rng = np.random.default_rng(4)
    H, W = 5, 7
    K = np.array([[9.5, 0, 3.2], [0, 8.25, 2.1], [0, 0, 1]], dtype=np.float32)
    c2w = np.concatenate([random_rotation(rng), rng.normal(size=(3, 1))], 1).astype(np.float32)
    o_t, d_t = get_rays(H, W, torch.from_numpy(K), torch.from_numpy(c2w))
    o_n, d_n = get_rays_np(H, W, K, c2w)
    assert o_t.shape == d_t.shape == o_n.shape == d_n.shape == (H, W, 3)
    np.testing.assert_allclose(o_t.numpy(), o_n, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d_t.numpy(), d_n, rtol=0, atol=1e-6)

    R, t = c2w[:, :3].astype(np.float64), c2w[:, 3].astype(np.float64)
    for j in range(H):
        for i in range(W):
            cam = np.array([(i - K[0, 2]) / K[0, 0], -(j - K[1, 2]) / K[1, 1], -1.0])
            np.testing.assert_allclose(d_t[j, i].numpy(), R @ cam, rtol=0, atol=1e-5)
            np.testing.assert_allclose(o_t[j, i].numpy(), t, rtol=0, atol=1e-6)


def test_centre_pixel_looks_along_camera_minus_z():
    rng = np.random.default_rng(5)
    H, W, f = 6, 8, 7.0
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    R = random_rotation(rng)
    c2w = torch.from_numpy(np.concatenate([R, rng.normal(size=(3, 1))], 1)).float()
    _, rays_d = get_rays(H, W, K, c2w)
    np.testing.assert_allclose(rays_d[H // 2, W // 2].numpy(), -R[:, 2], rtol=0, atol=1e-6)
    # Columns grow to the camera's right, rows grow downwards (against its up axis).
    step_i = (rays_d[H // 2, W // 2 + 1] - rays_d[H // 2, W // 2]).numpy()
    step_j = (rays_d[H // 2 + 1, W // 2] - rays_d[H // 2, W // 2]).numpy()
    np.testing.assert_allclose(step_i, R[:, 0] / f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(step_j, -R[:, 1] / f, rtol=0, atol=1e-6)


def ndc_point(p, H, W, focal, near):
    """The NDC projection of a world (camera-space) point, float64."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([-focal / (W / 2) * x / z, -focal / (H / 2) * y / z, 1 + 2 * near / z], -1)


def test_ndc_rays_near_plane_and_infinity():
    rng = np.random.default_rng(6)
    H, W, focal, near = 30, 40, 35.0, 1.0
    n = 16
    rays_o = np.concatenate([rng.uniform(-0.3, 0.3, (n, 2)), rng.uniform(-0.5, 0.5, (n, 1))], 1)
    rays_d = np.concatenate([rng.uniform(-0.4, 0.4, (n, 2)), -rng.uniform(0.8, 1.2, (n, 1))], 1)
    o_ndc, d_ndc = ndc_rays(H, W, focal, near, torch.from_numpy(rays_o), torch.from_numpy(rays_d))
    o_ndc, d_ndc = o_ndc.numpy(), d_ndc.numpy()

    # The origin is moved to z = -near, which NDC maps to z' = -1.
    np.testing.assert_allclose(o_ndc[:, 2], -1.0, rtol=0, atol=1e-12)
    shift = (-near - rays_o[:, 2]) / rays_d[:, 2]
    start = rays_o + shift[:, None] * rays_d
    np.testing.assert_allclose(start[:, 2], -near, atol=1e-12)
    np.testing.assert_allclose(o_ndc, ndc_point(start, H, W, focal, near), rtol=0, atol=1e-12)

    # World points further along each ray map onto o' + t d' with t in [0, 1),
    # t growing with depth and reaching z' = +1 only at infinity.
    prev_t = np.zeros(n)
    for s in [0.5, 2.0, 10.0, 1e3, 1e7]:
        q = ndc_point(start + s * rays_d, H, W, focal, near)
        t = (q[:, 2] - o_ndc[:, 2]) / d_ndc[:, 2]
        np.testing.assert_allclose(q, o_ndc + t[:, None] * d_ndc, rtol=0, atol=1e-9)
        assert np.all(t > prev_t) and np.all(t < 1)
        prev_t = t
    assert np.all(q[:, 2] > 1 - 1e-6)
    np.testing.assert_allclose(o_ndc[:, 2] + d_ndc[:, 2], 1.0, rtol=0, atol=1e-12)


# --- Hierarchical sampling ---------------------------------------------------

def make_bins(rng, n_rays, n_bins):
    widths = rng.uniform(0.2, 1.0, size=(n_rays, n_bins))
    return np.concatenate([np.full((n_rays, 1), 2.0), 2.0 + np.cumsum(widths, -1)], -1)


def test_sample_pdf_matches_inverse_cdf_twin():
    """Deterministic samples are the piecewise-linear inverse of the CDF of
    (weights + 1e-5), normalised: np.interp(u, cdf, bins) in float64."""
    rng = np.random.default_rng(7)
    bins = make_bins(rng, 6, 10)
    weights = rng.uniform(0, 1, size=(6, 10)) * (rng.uniform(size=(6, 10)) > 0.3)
    got = sample_pdf(torch.from_numpy(bins).float(), torch.from_numpy(weights).float(), 33, det=True)
    assert got.shape == (6, 33)
    u = np.linspace(0, 1, 33)
    for r in range(6):
        w = weights[r] + 1e-5
        cdf = np.concatenate([[0.0], np.cumsum(w / w.sum())])
        np.testing.assert_allclose(got[r].numpy(), np.interp(u, cdf, bins[r]), rtol=0, atol=1e-4)


def test_sample_pdf_single_bin_gets_every_sample():
    rng = np.random.default_rng(8)
    n_rays, n_bins, k = 5, 12, 7
    bins = torch.from_numpy(make_bins(rng, n_rays, n_bins)).float()
    weights = torch.zeros(n_rays, n_bins)
    weights[:, k] = 1.0
    lo, hi = bins[:, k:k + 1], bins[:, k + 1:k + 2]

    det = sample_pdf(bins, weights, 64, det=True)
    # u = 0 and u = 1 fall on the 1e-5 regularisation mass outside bin k and map
    # to the outer edges (as in the original); every other sample is inside.
    inner = det[:, 1:-1]
    assert torch.all((inner >= lo) & (inner <= hi))
    assert torch.allclose(det[:, 0], bins[:, 0]) and torch.allclose(det[:, -1], bins[:, -1])

    torch.manual_seed(0)
    rnd = sample_pdf(bins, weights, 400, det=False)
    inside = ((rnd >= lo) & (rnd <= hi)).float().mean().item()
    assert inside > 0.999      # outside mass is 11e-5 / (1 + 12e-5)
    assert torch.all((rnd >= bins[:, :1]) & (rnd <= bins[:, -1:]))


def test_sample_pdf_det_is_deterministic_and_random_otherwise():
    rng = np.random.default_rng(9)
    bins = torch.from_numpy(make_bins(rng, 4, 8)).float()
    weights = torch.from_numpy(rng.uniform(size=(4, 8))).float()
    torch.manual_seed(1)
    a = sample_pdf(bins, weights, 16, det=True)
    torch.manual_seed(2)
    b = sample_pdf(bins, weights, 16, det=True)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = sample_pdf(bins, weights, 16, det=False)
    torch.manual_seed(2)
    d = sample_pdf(bins, weights, 16, det=False)
    assert not torch.equal(c, d)
    assert torch.all(torch.diff(a, dim=-1) >= 0)


# --- Metrics -----------------------------------------------------------------

def test_metrics():
    x = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    y = torch.tensor([[0.1, 0.5], [0.7, 0.25]])
    mse = img2mse(x, y)
    assert mse.item() == pytest.approx((0.1 ** 2 + 0.3 ** 2) / 4, rel=1e-6)
    assert mse2psnr(torch.tensor(0.01)).item() == pytest.approx(20.0, rel=1e-6)
    assert mse2psnr(mse).item() == pytest.approx(-10 * np.log10((0.01 + 0.09) / 4), rel=1e-5)
    out = to8b(np.array([-0.5, 0.0, 0.5, 0.999, 1.0, 3.0]))
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 127, 254, 255, 255]     # clip, then truncate like the original
