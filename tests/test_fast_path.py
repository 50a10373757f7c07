"""The fast path computes what the original computes.

- One training step (coarse + fine networks, view directions, a skip
  connection) through the library's default (fast) path, in float32, against
  a plain float64 re-derivation of the original's formulas written here: an
  embedder looping over frequencies, a concatenation-based MLP, view
  directions materialised per sample. Colours, loss and every parameter's
  gradient agree to 1e-5.
- The fused MLP against the plain `NeRF.forward` path for several network
  shapes, chunkings and block sizes, to float64 rounding (and bit for bit in
  a training step with the default chunk sizes).
- The original's saved renders (reference/*.pt) through the fast path, and
  the fast path against the plain path on them.
- Its memory pool never hands out memory a live graph still holds.
- The ray samplers: rays bit-identical to get_rays, distinct pixels, the
  centre crop, and exact resumption from their state and the RNG states.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nerf import fast_mlp, rendering
from nerf.checkpoints import rng_state, set_rng_state
from nerf.ray_batches import ImageRaySampler, RayBatcher, draw_distinct, rays_at
from run_nerf_helpers import NeRF, get_embedder, get_rays, get_rays_np, img2mse


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- A plain float64 re-derivation of the original ---------------------------

def ref_embed(x, multires):
    parts = [x]
    for k in range(multires):
        parts += [torch.sin(x * 2.0 ** k), torch.cos(x * 2.0 ** k)]
    return torch.cat(parts, -1)


def ref_mlp(p, pts_enc, views_enc, D, skips):
    """p: name -> float64 parameter; the original's forward with explicit concatenations."""
    h = pts_enc
    for i in range(D):
        h = F.relu(h @ p[f"pts_linears.{i}.weight"].t() + p[f"pts_linears.{i}.bias"])
        if i in skips:
            h = torch.cat([pts_enc, h], -1)
    alpha = h @ p["alpha_linear.weight"].t() + p["alpha_linear.bias"]
    feature = h @ p["feature_linear.weight"].t() + p["feature_linear.bias"]
    h = torch.cat([feature, views_enc], -1)
    h = F.relu(h @ p["views_linears.0.weight"].t() + p["views_linears.0.bias"])
    rgb = h @ p["rgb_linear.weight"].t() + p["rgb_linear.bias"]
    return torch.cat([rgb, alpha], -1)


def ref_composite(raw, z, rays_d, white_bkgd):
    dists = torch.cat([z[:, 1:] - z[:, :-1], torch.full_like(z[:, :1], 1e10)], -1)
    dists = dists * torch.linalg.norm(rays_d, dim=-1, keepdim=True)
    rgb = torch.sigmoid(raw[..., :3])
    alpha = 1.0 - torch.exp(-F.relu(raw[..., 3]) * dists)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * trans
    rgb_map = (weights[..., None] * rgb).sum(1)
    acc = weights.sum(1)
    if white_bkgd:
        rgb_map = rgb_map + (1.0 - acc[:, None])
    return rgb_map, weights


def ref_sample_pdf_det(bins, weights, n):
    weights = weights + 1e-5
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    u = torch.linspace(0.0, 1.0, n, dtype=cdf.dtype).expand(cdf.shape[0], n).contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below = (inds - 1).clamp(min=0)
    above = inds.clamp(max=cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(1, below), cdf.gather(1, above)
    b0, b1 = bins.gather(1, below), bins.gather(1, above)
    denom = torch.where(c1 - c0 < 1e-5, torch.ones_like(c0), c1 - c0)
    return b0 + (u - c0) / denom * (b1 - b0)


def ref_render_rays(rays_o, rays_d, near, far, coarse, fine, cfg):
    viewdirs = rays_d / torch.linalg.norm(rays_d, dim=-1, keepdim=True)
    t = torch.linspace(0.0, 1.0, cfg["N_samples"], dtype=rays_o.dtype)
    z = (near * (1.0 - t) + far * t).expand(rays_o.shape[0], cfg["N_samples"])

    def query(p, z):
        pts = rays_o[:, None, :] + rays_d[:, None, :] * z[..., None]
        dirs = viewdirs[:, None, :].expand(pts.shape)                    # per sample, as the original
        raw = ref_mlp(p, ref_embed(pts.reshape(-1, 3), cfg["multires"]),
                      ref_embed(dirs.reshape(-1, 3), cfg["multires_views"]), cfg["D"], cfg["skips"])
        return raw.reshape(pts.shape[0], pts.shape[1], -1)

    rgb0, weights = ref_composite(query(coarse, z), z, rays_d, cfg["white_bkgd"])
    mids = 0.5 * (z[:, 1:] + z[:, :-1])
    z_fine = ref_sample_pdf_det(mids, weights[:, 1:-1], cfg["N_importance"]).detach()
    z_all, _ = torch.sort(torch.cat([z, z_fine], -1), -1)
    rgb, _ = ref_composite(query(fine, z_all), z_all, rays_d, cfg["white_bkgd"])
    return rgb, rgb0


# --- One training step --------------------------------------------------------

CFG = dict(D=4, W=32, skips=[1], multires=10, multires_views=4, N_samples=16, N_importance=24,
           white_bkgd=True, near=2.0, far=6.0)


def small_scene_rays(n_rays=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    rays_o = torch.randn(n_rays, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 4.0])
    rays_d = torch.randn(n_rays, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, -1.0])
    target = torch.rand(n_rays, 3, generator=g)
    return rays_o, rays_d, target


def make_networks(seed=0):
    torch.manual_seed(seed)
    embed, input_ch = get_embedder(CFG["multires"])
    embeddirs, input_ch_views = get_embedder(CFG["multires_views"])
    nets = [NeRF(D=CFG["D"], W=CFG["W"], input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5,
                 skips=CFG["skips"], use_viewdirs=True) for _ in range(2)]
    # Larger densities than the default init so that the compositing matters.
    for net in nets:
        with torch.no_grad():
            net.alpha_linear.bias.fill_(0.5)
    return nets, embed, embeddirs


def fast_step(nets, embed, embeddirs, rays_o, rays_d, target, chunk=1024 * 32, netchunk=1024 * 64, fast=True):
    query = lambda pts, viewdirs, fn: rendering.run_network(pts, viewdirs, fn, embed, embeddirs,
                                                            netchunk=netchunk, fast=fast)
    rgb, _, _, extras = rendering.render(
        1, 1, np.eye(3), chunk=chunk, rays=(rays_o, rays_d), ndc=False, near=CFG["near"], far=CFG["far"],
        use_viewdirs=True, network_fn=nets[0], network_fine=nets[1], network_query_fn=query,
        N_samples=CFG["N_samples"], N_importance=CFG["N_importance"], perturb=0.0, raw_noise_std=0.0,
        white_bkgd=CFG["white_bkgd"], retraw=True)
    loss = img2mse(rgb, target) + img2mse(extras["rgb0"], target)
    for net in nets:
        net.zero_grad()
    loss.backward()
    grads = [{k: p.grad.detach().clone() for k, p in net.named_parameters() if p.grad is not None} for net in nets]
    return rgb.detach(), extras["rgb0"].detach(), loss.detach(), grads


def test_training_step_matches_float64_rederivation():
    nets, embed, embeddirs = make_networks()
    rays_o, rays_d, target = small_scene_rays()
    assert fast_mlp.supports(nets[0], embed, embeddirs, torch.zeros(2, 3, 3), torch.zeros(2, 3))
    rgb, rgb0, loss, grads = fast_step(nets, embed, embeddirs, rays_o, rays_d, target)

    params64 = [{k: p.detach().double().requires_grad_(True) for k, p in net.named_parameters()} for net in nets]
    ref_rgb, ref_rgb0 = ref_render_rays(rays_o.double(), rays_d.double(), CFG["near"], CFG["far"],
                                        params64[0], params64[1], CFG)
    ref_loss = torch.mean((ref_rgb - target.double()) ** 2) + torch.mean((ref_rgb0 - target.double()) ** 2)
    ref_loss.backward()

    # colours in [0, 1]: measured up to 1.8e-7 over seeds 0-4
    assert (rgb.double() - ref_rgb).abs().max() < 1e-5
    assert (rgb0.double() - ref_rgb0).abs().max() < 1e-5
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    n_checked = 0
    for got, want in zip(grads, params64):
        for name, p in want.items():
            if p.grad is None:
                continue
            assert name in got, name
            # float32 against float64, measured over seeds 0-4: at most 4.3e-8 absolute, and up to 5.7e-3 of the
            # parameter's largest gradient where early layers' gradients are small sums of larger terms
            # (cancellation). A zero or sign-flipped gradient is off by 100% or more of it.
            err = (got[name].double() - p.grad).abs().max().item()
            assert err < min(1e-5, 0.05 * p.grad.abs().max().item()), f"{name}: gradient differs by {err:.3g}"
            n_checked += 1
    assert n_checked == 2 * (2 * CFG["D"] + 8)


def test_training_step_fast_equals_plain_path():
    nets, embed, embeddirs = make_networks(seed=1)
    rays_o, rays_d, target = small_scene_rays(seed=1)
    fast = fast_step(nets, embed, embeddirs, rays_o, rays_d, target)
    plain = fast_step(nets, embed, embeddirs, rays_o, rays_d, target, fast=False)
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])   # forward: the same products
    for g_fast, g_plain in zip(fast[3], plain[3]):
        assert g_fast.keys() == g_plain.keys()
        for k in g_fast:
            torch.testing.assert_close(g_fast[k], g_plain[k], rtol=1e-4, atol=1e-6)


# --- The fused MLP against NeRF.forward ----------------------------------------

@pytest.mark.parametrize("D,W,skips,viewdirs,i_embed,n_rays,n_samples,netchunk,block", [
    (4, 16, [2], True, 0, 37, 11, 100, None),
    (4, 16, [2], True, 0, 37, 11, 65536, 64),
    (8, 32, [4], True, 0, 20, 16, 100, 128),
    (8, 32, [4], False, 0, 20, 16, 1000, 128),
    (3, 16, [4], False, -1, 9, 7, 30, None),
    (4, 16, [0, 1], True, 0, 13, 5, 7, 64),
])
def test_fused_network_matches_module_forward(D, W, skips, viewdirs, i_embed, n_rays, n_samples, netchunk, block):
    torch.manual_seed(0)
    embed, input_ch = get_embedder(10, i_embed)
    embeddirs, input_ch_views = get_embedder(4, i_embed) if viewdirs else (None, 0)
    net = NeRF(D=D, W=W, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5 if not viewdirs else 4,
               skips=skips, use_viewdirs=viewdirs).double()
    pts = torch.randn(n_rays, n_samples, 3, dtype=torch.float64)
    dirs = F.normalize(torch.randn(n_rays, 3, dtype=torch.float64), dim=-1) if viewdirs else None
    assert fast_mlp.supports(net, embed, embeddirs, pts, dirs)
    weight = torch.randn(n_rays, n_samples, 4 if viewdirs else 5, dtype=torch.float64)

    want = rendering.run_network(pts, dirs, net, embed, embeddirs, netchunk=netchunk, fast=False)
    (want * weight).sum().backward()
    want_grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    got = fast_mlp.query(net, pts, dirs, embed, embeddirs, netchunk=netchunk, block_rows=block)
    (got * weight).sum().backward()
    got_grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    # Chunk and block boundaries differ from the plain path's here, and small
    # products' kernels depend on the row count: equal to float64 rounding.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    assert got_grads.keys() == want_grads.keys()
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fast_mlp.query(net, pts, dirs, embed, embeddirs, netchunk=netchunk,
                                                   block_rows=block), want, rtol=0, atol=1e-13)


def test_plain_path_for_what_the_fast_path_does_not_know():
    embed, input_ch = get_embedder(10)
    embeddirs, input_ch_views = get_embedder(4)
    net = NeRF(D=2, W=8, input_ch=input_ch, input_ch_views=input_ch_views, use_viewdirs=True)
    pts, dirs = torch.zeros(2, 3, 3), torch.zeros(2, 3)
    assert fast_mlp.supports(net, embed, embeddirs, pts, dirs)

    class Fork(NeRF):
        def forward(self, x):
            return super().forward(x) * 2

    fork = Fork(D=2, W=8, input_ch=input_ch, input_ch_views=input_ch_views, use_viewdirs=True)
    assert not fast_mlp.supports(fork, embed, embeddirs, pts, dirs)
    assert not fast_mlp.supports(net, lambda x: x, embeddirs, pts, dirs)
    assert not fast_mlp.supports(net, embed, embeddirs, pts.requires_grad_(), dirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_mlp.supports(net, embed, embeddirs, torch.zeros(2, 3, 3), dirs)
    out = rendering.run_network(torch.randn(2, 3, 3), F.normalize(torch.randn(2, 3), dim=-1), fork, embed, embeddirs)
    assert out.shape == (2, 3, 4)


def test_mixed_precision_query_runs_the_plain_path_in_bfloat16():
    nets, embed, embeddirs = make_networks(seed=3)
    pts, dirs = torch.randn(4, 5, 3), F.normalize(torch.randn(4, 3), dim=-1)
    exact = rendering.make_network_query_fn(embed, embeddirs, 1024)(pts, dirs, nets[0])
    mixed = rendering.make_network_query_fn(embed, embeddirs, 1024, mixed_precision=True)(pts, dirs, nets[0])
    assert mixed.dtype == torch.float32 and mixed.shape == exact.shape
    assert not torch.equal(mixed, exact) and (mixed - exact).abs().max() < 0.1


# --- Memory reuse ---------------------------------------------------------------

def test_pool_never_hands_out_memory_a_graph_holds():
    nets, embed, embeddirs = make_networks(seed=2)
    pts = torch.randn(10, 8, 3)
    dirs = F.normalize(torch.randn(10, 3), dim=-1)
    a = fast_mlp.query(nets[0], pts, dirs, embed, embeddirs)
    b = fast_mlp.query(nets[0], pts * 0.5, dirs, embed, embeddirs)     # both graphs alive
    (a.sum() + 0 * b.sum()).backward(retain_graph=True)
    grads = [p.grad.clone() for p in nets[0].parameters() if p.grad is not None]
    nets[0].zero_grad()
    a.sum().backward()                                                  # the retained graph's memory was kept
    again = [p.grad.clone() for p in nets[0].parameters() if p.grad is not None]
    for g1, g2 in zip(grads, again):
        assert torch.equal(g1, g2)
    del a, b
    n_buffers = len(fast_mlp._POOL.buffers)
    for _ in range(3):                                                  # steady state: memory reused
        fast_mlp.query(nets[0], pts, dirs, embed, embeddirs).sum().backward()
    assert len(fast_mlp._POOL.buffers) <= n_buffers + 1


# --- The original's saved renders -------------------------------------------------

@pytest.mark.parametrize("name", ["render_llff_ndc_fine.pt", "render_blender_white_fine.pt"])
def test_reference_renders_through_the_fast_path(reference_dir, name):
    ref = torch.load(reference_dir / name, weights_only=True)
    cfg = ref["config"]
    H, W, focal = int(cfg["H"]), int(cfg["W"]), float(cfg["focal"])
    K = np.array([[focal, 0, 0.5 * W], [0, focal, 0.5 * H], [0, 0, 1]])
    embed, input_ch = get_embedder(cfg["multires"])
    embeddirs, input_ch_views = get_embedder(cfg["multires_views"])

    def network(key):
        net = NeRF(D=cfg["netdepth"], W=cfg["netwidth"], skips=cfg["skips"], use_viewdirs=True,
                   input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5)
        net.load_state_dict(ref[key])
        return net

    nets = network("network_fn_state_dict"), network("network_fine_state_dict")
    assert fast_mlp.supports(nets[0], embed, embeddirs, torch.zeros(1, 1, 3), torch.zeros(1, 3))
    def render(fast, coarse_maps=True):
        def query(pts, viewdirs, fn, density_only=False):
            return rendering.run_network(pts, viewdirs, fn, embed, embeddirs, fast=fast, density_only=density_only)
        with torch.no_grad():
            rgb, disp, acc, extras = rendering.render(
                H, W, K, c2w=ref["c2w"], ndc=cfg["ndc"], near=cfg["near"], far=cfg["far"], use_viewdirs=True,
                network_fn=nets[0], network_fine=nets[1], network_query_fn=query, N_samples=cfg["N_samples"],
                N_importance=cfg["N_importance"], perturb=0.0, raw_noise_std=0.0, white_bkgd=cfg["white_bkgd"],
                lindisp=cfg["lindisp"], coarse_maps=coarse_maps)
        return dict(rgb_map=rgb, disp_map=disp, acc_map=acc, **extras)

    fast_out, plain_out = render(fast=True), render(fast=False)
    for key in ["rgb_map", "disp_map", "acc_map", "rgb0", "disp0", "acc0", "z_std"]:
        diff = (fast_out[key] - ref[key]).abs()
        assert diff.max() <= 1e-2 and (diff > 1e-5).float().mean() <= 0.005, key
        # Same products as the plain path: the coarse maps to the last bit on any CPU,
        # and so (the fine samples follow them) the fine ones.
        torch.testing.assert_close(fast_out[key], plain_out[key], rtol=0, atol=1e-6)
    # render_path's frames: the coarse pass asks for densities only, and the
    # fine maps come out bit for bit the same.
    for fast, full in ((True, fast_out), (False, plain_out)):
        lean = render(fast, coarse_maps=False)
        assert sorted(lean) == ["acc_map", "disp_map", "rgb_map", "z_std"]
        for key in lean:
            assert torch.equal(lean[key], full[key]), (fast, key)


@pytest.mark.parametrize("viewdirs", [True, False])
def test_density_only_is_the_sigma_channel(viewdirs):
    torch.manual_seed(4)
    embed, input_ch = get_embedder(10)
    embeddirs, input_ch_views = get_embedder(4) if viewdirs else (None, 0)
    net = NeRF(D=4, W=32, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5, skips=[2],
               use_viewdirs=viewdirs)
    pts = torch.randn(50, 24, 3)
    dirs = F.normalize(torch.randn(50, 3), dim=-1) if viewdirs else None
    for fast in (True, False):
        with torch.no_grad():
            full = rendering.run_network(pts, dirs, net, embed, embeddirs, netchunk=200, fast=fast)
            sigma = rendering.run_network(pts, dirs, net, embed, embeddirs, netchunk=200, fast=fast,
                                          density_only=True)
        assert sigma.shape == (50, 24, 1) and torch.equal(sigma, full[..., 3:4]), fast
    # With gradients recorded the plain path serves it, and sigma has a gradient.
    sigma = rendering.run_network(pts, dirs, net, embed, embeddirs, density_only=True)
    sigma.sum().backward()
    assert torch.equal(sigma.detach(), full[..., 3:4]) and net.pts_linears[0].weight.grad.abs().sum() > 0


def test_no_grad_evaluation_keeps_block_scratch_not_the_activations():
    nets, embed, embeddirs = make_networks(seed=5)
    pts, dirs = torch.randn(64, 64, 3), F.normalize(torch.randn(64, 3), dim=-1)     # 4096 points

    def pooled_after(grad):
        fast_mlp.release_memory()
        with torch.set_grad_enabled(grad):
            out = fast_mlp.query(nets[1], pts, dirs, embed, embeddirs, block_rows=256)
        n = sum(b.numel() for b in fast_mlp._POOL.buffers)
        del out
        return n

    kept, scratch = pooled_after(True), pooled_after(False)
    fast_mlp.release_memory()
    assert kept >= 4096 * CFG["W"] * CFG["D"]          # every layer's activations for the backward pass
    assert scratch * 8 <= kept                          # 16 blocks: one block's worth (and a spare)


# --- Ray samplers -------------------------------------------------------------------

def small_images(n=5, H=12, W=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, H, W, 3), dtype=np.float32)
    poses = np.tile(np.eye(4, dtype=np.float32)[None, :3, :4], (n, 1, 1))
    poses[:, :3, 3] = rng.normal(size=(n, 3)).astype(np.float32)
    K = np.array([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]])
    return images, poses, K


def test_rays_at_equals_get_rays_at_those_pixels():
    images, poses, K = small_images()
    H, W = images.shape[1:3]
    c2w = torch.from_numpy(poses[2])
    rays_o, rays_d = get_rays(H, W, K, c2w)
    rows, cols = torch.randint(0, H, (100,)), torch.randint(0, W, (100,))
    o, d = rays_at(K, c2w, rows, cols)
    assert torch.equal(o, rays_o[rows, cols]) and torch.equal(d, rays_d[rows, cols])


def test_draw_distinct():
    np.random.seed(0)
    for n_pop, n in [(1000, 10), (1000, 400), (50, 50), (160000, 1024)]:
        got = draw_distinct(n_pop, n)
        assert len(got) == n and len(np.unique(got)) == n and got.min() >= 0 and got.max() < n_pop
    counts = np.zeros(20)
    for _ in range(4000):
        counts[draw_distinct(20, 3)] += 1
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    with pytest.raises(ValueError):
        draw_distinct(5, 6)


def test_image_sampler_rays_targets_and_crop():
    images, poses, K = small_images()
    H, W = images.shape[1:3]
    sampler = ImageRaySampler(images, poses, [0, 2, 4], H, W, K, 30, precrop_iters=10, precrop_frac=0.5,
                              device=torch.device("cpu"))
    np.random.seed(3)
    for step in (1, 20):
        state = np.random.get_state()
        batch_rays, target = sampler(step)
        np.random.set_state(state)
        img_i = int(np.random.choice([0, 2, 4]))
        assert batch_rays.shape == (2, 30, 3) and target.shape == (30, 3)
        # find each target pixel in the drawn image and check its ray
        rays_o, rays_d = get_rays(H, W, K, torch.from_numpy(poses[img_i]))
        flat = torch.from_numpy(images[img_i]).reshape(-1, 3)
        idx = torch.tensor([int(torch.nonzero((flat == t).all(-1))[0]) for t in target])
        rows, cols = idx // W, idx % W
        assert len(set(idx.tolist())) == 30
        assert torch.equal(batch_rays[0], rays_o[rows, cols]) and torch.equal(batch_rays[1], rays_d[rows, cols])
        if step < 10:
            assert rows.min() >= H // 2 - 3 and rows.max() < H // 2 + 3
            assert cols.min() >= W // 2 - 4 and cols.max() < W // 2 + 4


@pytest.mark.parametrize("no_batching", [False, True])
def test_samplers_resume_exactly(no_batching):
    images, poses, K = small_images()
    H, W = images.shape[1:3]

    def make():
        if no_batching:
            return ImageRaySampler(images, poses, [0, 1, 3], H, W, K, 17, 5, 0.5, torch.device("cpu"))
        return RayBatcher(images, poses, [0, 1, 3], H, W, K, 100, torch.device("cpu"))

    np.random.seed(0)
    torch.manual_seed(0)
    sampler = make()
    for i in range(1, 8):
        sampler(i)
    state, rng = sampler.state_dict(), rng_state()
    straight = [sampler(i) for i in range(8, 20)]        # crosses an epoch (576 rays / 100)

    np.random.seed(123)
    torch.manual_seed(123)
    resumed = make()
    resumed.load_state_dict(state)
    set_rng_state(rng)
    for i, (rays, target) in zip(range(8, 20), straight):
        r, t = resumed(i)
        assert torch.equal(r, rays) and torch.equal(t, target)


@pytest.mark.parametrize("no_batching", [False, True])
def test_host_memory_path_draws_the_same_batches(no_batching):
    """Over the device budget the data stays in host memory and batches are
    gathered there (and prefetched): the same batches, the same resumption."""
    images, poses, K = small_images()
    H, W = images.shape[1:3]

    def make(budget):
        if no_batching:
            return ImageRaySampler(images, poses, [0, 1, 3], H, W, K, 17, 5, 0.5, torch.device("cpu"),
                                   device_budget_bytes=budget)
        return RayBatcher(images, poses, [0, 1, 3], H, W, K, 100, torch.device("cpu"), device_budget_bytes=budget)

    runs = []
    for budget in (None, 0):
        np.random.seed(0)
        torch.manual_seed(0)
        sampler = make(budget)
        assert (sampler.fetch is None) == (budget is None)
        runs.append([sampler(i) for i in range(1, 15)])
    for (r0, t0), (r1, t1) in zip(*runs):
        assert torch.equal(r0, r1) and torch.equal(t0, t1)


def test_batcher_rays_are_the_images_rays():
    images, poses, K = small_images()
    H, W = images.shape[1:3]
    np.random.seed(0)
    batcher = RayBatcher(images, poses, [1, 4], H, W, K, 2 * H * W, torch.device("cpu"))
    batch_rays, target = batcher(1)                       # every ray, shuffled
    want = []
    for i in (1, 4):
        o, d = get_rays_np(H, W, K, poses[i])
        want.append(np.concatenate([np.broadcast_to(o, d.shape), d, images[i]], -1).reshape(-1, 9))
    want = np.concatenate(want, 0)
    got = torch.cat([batch_rays[0], batch_rays[1], target], -1).numpy()
    order = np.lexsort(got.T[::-1])
    order_w = np.lexsort(want.T[::-1])
    np.testing.assert_allclose(got[order], want[order_w], rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_rays, N_samples, N_importance", [(1, 7, 16), (13, 7, 5), (5, 10, 3)])
def test_density_only_coarse_pass_gives_the_same_fine_samples(n_rays, N_samples, N_importance):
    """Odd sample counts put ray ends anywhere in the product's row tiles:
    the density-only and the full coarse pass must still give sigma, hence
    the fine samples, bit for bit."""
    nets, embed, embeddirs = make_networks(seed=6)
    query = rendering.make_network_query_fn(embed, embeddirs, 1024)
    rays_o, rays_d = torch.randn(n_rays, 3) * 0.2, F.normalize(torch.randn(n_rays, 3), dim=-1)
    batch = torch.cat([rays_o, rays_d, torch.full((n_rays, 1), 2.0), torch.full((n_rays, 1), 6.0), rays_d], -1)
    for trial in range(20):
        torch.manual_seed(100 + trial)
        for net in nets:
            for p in net.parameters():
                p.data.normal_(0, 0.3)
        outs = []
        for coarse_maps in (True, False):
            with torch.no_grad():
                outs.append(rendering.render_rays(batch, nets[0], query, N_samples, N_importance=N_importance,
                                                  network_fine=nets[1], coarse_maps=coarse_maps))
        for key in ["rgb_map", "disp_map", "acc_map", "z_std"]:
            assert torch.equal(outs[0][key], outs[1][key]), (trial, key)
