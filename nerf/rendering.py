"""Volume rendering: from camera rays to pixel colours, one pipeline step per function.

    rays -> sample_along_rays -> network -> raw2outputs -> (sample_pdf -> network -> raw2outputs)

Shapes: N rays, S samples per ray. A ray batch packs, per ray,
[rays_o (3), rays_d (3), near (1), far (1), viewdirs (3, optional)].
"""
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nerf import fast_mlp, geometry
from nerf.outputs import write_image
import run_nerf_helpers as helpers     # get_rays, ndc_rays, sample_pdf looked up at call time: a fork may replace them
from run_nerf_helpers import pytest_uniform, to8b


def batchify(fn: Callable, chunk: Optional[int]) -> Callable:
    """`fn` applied to at most `chunk` rows of its input at a time, outputs
    concatenated along the first axis (`fn` itself for chunk None). An input
    of no rows is one call (the occupancy sampler's chunk of rays may hold
    no sample)."""
    if chunk is None:
        return fn

    def batched(inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(inputs[i:i + chunk]) for i in range(0, max(inputs.shape[0], 1), chunk)], 0)

    return batched

log = logging.getLogger("nerf")


def run_network(inputs: torch.Tensor, viewdirs: Optional[torch.Tensor], fn: Callable,
                embed_fn: Callable, embeddirs_fn: Optional[Callable],
                netchunk: int = 1024 * 64, fast: bool = True, density_only: bool = False) -> torch.Tensor:
    """Encodes points (N, S, 3) and view directions (N, 3) and runs the MLP `fn`
    over at most `netchunk` points at a time. Returns (N, S, C), or with
    `density_only` just sigma (N, S, 1) (the raw output's channel 3).

    With `fast` (the default) a library `NeRF` runs through `fast_mlp`: the
    same network and formulas in fewer, fused operations (see there); without
    gradients, `density_only` there skips the colour layers. Other networks or
    encoders, autocast, or `fast=False` take the plain path, `plain_network`,
    and so does a network or encoder whose code was edited in place: on first
    use both paths are compared on a probe batch (`fast_mlp.matches_plain_path`).
    """
    if (fast and not (density_only and torch.is_grad_enabled())
            and fast_mlp.supports(fn, embed_fn, embeddirs_fn, inputs, viewdirs)):
        def plain(pts, dirs):
            return plain_network(pts, dirs, fn, embed_fn, embeddirs_fn, netchunk)

        if fast_mlp.matches_plain_path(fn, embed_fn, embeddirs_fn, inputs, viewdirs, netchunk, plain):
            return fast_mlp.query(fn, inputs, viewdirs, embed_fn, embeddirs_fn, netchunk,
                                   density_only=density_only)
    return plain_network(inputs, viewdirs, fn, embed_fn, embeddirs_fn, netchunk, density_only)


def plain_network(inputs: torch.Tensor, viewdirs: Optional[torch.Tensor], fn: Callable,
                  embed_fn: Callable, embeddirs_fn: Optional[Callable],
                  netchunk: int = 1024 * 64, density_only: bool = False) -> torch.Tensor:
    """`run_network` as the original computes it: the encodings concatenated
    per point, the view direction repeated for each of its ray's samples, and
    `fn` called on at most `netchunk` rows at a time. Shapes as `run_network`."""
    inputs_flat = inputs.reshape(-1, inputs.shape[-1])
    embedded = embed_fn(inputs_flat)
    if viewdirs is not None:
        dirs_flat = viewdirs[:, None].expand(inputs.shape).reshape(-1, 3)
        embedded = torch.cat([embedded, embeddirs_fn(dirs_flat)], -1)
    outputs_flat = batchify(fn, netchunk)(embedded)
    if density_only:
        outputs_flat = outputs_flat[:, 3:4]
    return outputs_flat.reshape(list(inputs.shape[:-1]) + [outputs_flat.shape[-1]])


class NetworkQuery:
    """The `network_query_fn(inputs, viewdirs, network_fn, density_only=False)`
    of the render kwargs (see `run_network`), over at most `netchunk` points
    at a time.

    Default: `run_network` (its fast path for library networks, unless
    `fast` is False: `--fast_path off`). Off-by-default
    modes: `mixed_precision` runs the networks under bfloat16 autocast (the
    plain path; outputs back in float32); `compiled` maps id(module) to a
    `torch.compile`d callable used in the module's place (the module itself
    stays in the render kwargs, so checkpoints keep its parameter names).
    """

    def __init__(self, embed_fn: Callable, embeddirs_fn: Optional[Callable], netchunk: int,
                 mixed_precision: bool = False, compiled: Optional[dict] = None, fast: bool = True):
        self.embed_fn, self.embeddirs_fn, self.netchunk = embed_fn, embeddirs_fn, netchunk
        self.mixed_precision, self.compiled, self.fast = mixed_precision, compiled or {}, fast

    def __call__(self, inputs: torch.Tensor, viewdirs: Optional[torch.Tensor], network_fn: Callable,
                 density_only: bool = False) -> torch.Tensor:
        fn = self.compiled.get(id(network_fn), network_fn)
        if not self.mixed_precision:
            return run_network(inputs, viewdirs, fn, self.embed_fn, self.embeddirs_fn, self.netchunk, self.fast,
                               density_only)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
            out = run_network(inputs, viewdirs, fn, self.embed_fn, self.embeddirs_fn, self.netchunk,
                              density_only=density_only)
        return out.float()


def make_network_query_fn(embed_fn: Callable, embeddirs_fn: Optional[Callable], netchunk: int,
                          mixed_precision: bool = False, compiled: Optional[dict] = None,
                          fast: bool = True) -> NetworkQuery:
    """The render kwargs' `network_query_fn`: a `NetworkQuery`."""
    return NetworkQuery(embed_fn, embeddirs_fn, netchunk, mixed_precision, compiled, fast)


def accepts_density_only(network_query_fn: Callable) -> bool:
    """Whether `network_query_fn` takes `density_only` (the original's takes
    just (inputs, viewdirs, network_fn); forks may still pass one such)."""
    try:
        return "density_only" in inspect.signature(network_query_fn).parameters
    except (TypeError, ValueError):
        return False


def sample_along_rays(near: torch.Tensor, far: torch.Tensor, N_samples: int,
                      lindisp: bool = False, perturb: float = 0.0, pytest: bool = False) -> torch.Tensor:
    """Coarse sample depths z (N, S) between near and far (each (N, 1)).

    z = near (1 - t) + far t for t = linspace(0, 1, S), or linear in
    disparity with `lindisp`. With `perturb` each z is drawn uniformly within
    its interval bounded by the midpoints (the end intervals stop at near/far),
    with `pytest` at the original's fixed fractions (`pytest_uniform`).
    """
    t_vals = torch.linspace(0.0, 1.0, N_samples, dtype=near.dtype, device=near.device)
    if not lindisp:
        z_vals = near * (1.0 - t_vals) + far * t_vals
    else:
        z_vals = 1.0 / (1.0 / near * (1.0 - t_vals) + 1.0 / far * t_vals)
    z_vals = z_vals.expand(near.shape[0], N_samples)
    if perturb > 0.0:
        mids = 0.5 * (z_vals[..., 1:] + z_vals[..., :-1])
        upper = torch.cat([mids, z_vals[..., -1:]], -1)
        lower = torch.cat([z_vals[..., :1], mids], -1)
        t_rand = pytest_uniform(z_vals.shape, z_vals) if pytest else torch.rand_like(z_vals)
        z_vals = lower + (upper - lower) * t_rand
    return z_vals


def density(sigma: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Volume density from raw sigma: relu(sigma) (the original), or with
    `activation` "softplus" mip-NeRF's shifted softplus log(1 + exp(sigma - 1)),
    whose gradient is never zero (no network can die of all-negative densities)."""
    if activation == "softplus":
        return F.softplus(sigma - 1.0)
    return F.relu(sigma)


def sample_alpha(sigma: torch.Tensor, dists: torch.Tensor, raw_noise_std: float = 0, pytest: bool = False,
                 density_activation: str = "relu") -> torch.Tensor:
    """Each sample's opacity alpha (...) = 1 - exp(-density(sigma + noise) delta)
    from raw densities sigma (...) and the lengths delta (...) of the
    intervals they stand for; noise ~ N(0, raw_noise_std^2) (with `pytest`,
    the original's fixed uniform draws times raw_noise_std). Both the dense
    (`compositing_weights`) and the packed (`composite_packed`) compositing use it."""
    if raw_noise_std > 0.0:
        noise = pytest_uniform(sigma.shape, sigma) if pytest else torch.randn_like(sigma)
        sigma = sigma + noise * raw_noise_std
    return 1.0 - torch.exp(-density(sigma, density_activation) * dists)


def compositing_weights(sigma: torch.Tensor, z_vals: torch.Tensor, rays_d: torch.Tensor,
                        raw_noise_std: float = 0, pytest: bool = False,
                        density_activation: str = "relu") -> torch.Tensor:
    """Each sample's weight w (N, S) in the ray's colour, from densities sigma (N, S).

    delta_i = (z_{i+1} - z_i) |d| (1e10 after the last sample),
    alpha_i = 1 - exp(-relu(sigma_i + noise) delta_i), noise ~ N(0, raw_noise_std^2)
    (with `pytest`, the original's fixed uniform draws times raw_noise_std),
    w_i = alpha_i prod_{j<i} (1 - alpha_j + 1e-10). With `density_activation`
    "softplus", log(1 + exp(sigma_i + noise - 1)) replaces the relu (`density`).
    """
    dists = z_vals[..., 1:] - z_vals[..., :-1]
    dists = torch.cat([dists, torch.full_like(dists[..., :1], 1e10)], -1)
    dists = dists * torch.norm(rays_d[..., None, :], dim=-1)
    alpha = sample_alpha(sigma, dists, raw_noise_std, pytest, density_activation)
    transmittance = torch.cumprod(
        torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], -1), -1)[..., :-1]
    return alpha * transmittance


def raw2outputs(raw: torch.Tensor, z_vals: torch.Tensor, rays_d: torch.Tensor,
                raw_noise_std: float = 0, white_bkgd: bool = False, pytest: bool = False,
                density_activation: str = "relu"
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alpha-composites network outputs along each ray.

    raw: (N, S, 4) [rgb logits, sigma]; z_vals: (N, S); rays_d: (N, 3).
    With the weights w of `compositing_weights`, returns rgb_map (N, 3) =
    sum w sigmoid(logits) (+ 1 - acc on white), disp_map (N,) =
    1 / max(1e-10, depth / acc) (0 where acc is 0), acc_map (N,) = sum w,
    weights (N, S), depth_map (N,) = sum w z.

    Density: relu(sigma), or with `density_activation` "softplus"
    log(1 + exp(sigma - 1)) (mip-NeRF's shifted softplus; see `density`).
    """
    rgb = torch.sigmoid(raw[..., :3])
    weights = compositing_weights(raw[..., 3], z_vals, rays_d, raw_noise_std, pytest, density_activation)

    rgb_map = torch.sum(weights[..., None] * rgb, -2)
    depth_map = torch.sum(weights * z_vals, -1)
    acc_map = torch.sum(weights, -1)
    rgb_map, disp_map = finish_maps(rgb_map, depth_map, acc_map, white_bkgd)
    return rgb_map, disp_map, acc_map, weights, depth_map


def finish_maps(rgb_map: torch.Tensor, depth_map: torch.Tensor, acc_map: torch.Tensor,
                white_bkgd: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """From a ray's sums rgb_map = sum w c (N, 3), depth_map = sum w z (N,) and
    acc_map = sum w (N,): the colour (N, 3) (+ 1 - acc on white) and
    disp_map (N,) = 1 / max(1e-10, depth / acc) (0 where acc is 0)."""
    has_weight = acc_map > 0
    mean_depth = depth_map / torch.where(has_weight, acc_map, torch.ones_like(acc_map))
    disp_map = torch.where(has_weight, 1.0 / torch.clamp(mean_depth, min=1e-10),
                           torch.zeros_like(acc_map))
    if white_bkgd:
        rgb_map = rgb_map + (1.0 - acc_map[..., None])
    return rgb_map, disp_map


def segment_cumsum(values: torch.Tensor, ray_index: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per-ray inclusive cumulative sums (P,) of packed values (P,) sorted by
    ray (ray_index (P,)), summed in float64 (float32 on MPS, which has no
    float64) so that the earlier rays' sums cancel exactly enough."""
    wide = torch.float32 if values.device.type == "mps" else torch.float64
    total = torch.cumsum(values.to(wide), 0)
    counts = torch.zeros(n_rays, dtype=torch.long, device=values.device).index_add_(
        0, ray_index, torch.ones_like(ray_index))
    first = (torch.cumsum(counts, 0) - counts)[ray_index]                 # each sample's ray's first sample
    return (total - total[first] + values.to(wide)[first]).to(values.dtype)


def composite_packed(raw: torch.Tensor, t: torch.Tensor, delta: torch.Tensor, ray_index: torch.Tensor,
                     n_rays: int, raw_noise_std: float = 0, white_bkgd: bool = False,
                     density_activation: str = "relu", median_depth: bool = False) -> Dict[str, torch.Tensor]:
    """`raw2outputs` for packed samples: raw (P, 4) at depths t (P,) standing for
    intervals of length delta (P,) (world units), of rays ray_index (P,)
    (sorted by ray, then t) among n_rays. The same alpha (`sample_alpha`)
    and maps (`finish_maps`); the transmittance prod_{j<i} (1 - alpha_j + 1e-10)
    as exp of a per-ray sum of logs (`segment_cumsum`), sums per ray with
    index_add. Returns rgb_map (n_rays, 3), disp_map, acc_map (n_rays,), and
    with `median_depth` t_median (n_rays,) (`median_termination`'s rule; 0
    for a ray without samples)."""
    rgb = torch.sigmoid(raw[:, :3])
    alpha = sample_alpha(raw[:, 3], delta, raw_noise_std, False, density_activation)
    log_clear = torch.log(1.0 - alpha + 1e-10)
    weights = alpha * torch.exp(segment_cumsum(log_clear, ray_index, n_rays) - log_clear)
    zeros = raw.new_zeros(n_rays)
    rgb_map = raw.new_zeros(n_rays, 3).index_add(0, ray_index, weights[:, None] * rgb)
    depth_map = zeros.index_add(0, ray_index, weights * t)
    acc_map = zeros.index_add(0, ray_index, weights)
    rgb_map, disp_map = finish_maps(rgb_map, depth_map, acc_map, white_bkgd)
    out = {"rgb_map": rgb_map, "disp_map": disp_map, "acc_map": acc_map}
    if median_depth:
        out["t_median"] = packed_median_termination(weights, t, ray_index, acc_map)
    return out


def packed_median_termination(weights: torch.Tensor, t: torch.Tensor, ray_index: torch.Tensor,
                              acc_map: torch.Tensor) -> torch.Tensor:
    """`median_termination` for packed samples: weights and t (P,) of rays
    ray_index (P,) (sorted by ray, then t), acc_map (N,) their sums.
    Returns t (N,); 0 for a ray without samples."""
    n, P = acc_map.shape[0], t.shape[0]
    if P == 0:
        return torch.zeros_like(acc_map)
    cum = segment_cumsum(weights, ray_index, n)
    order = torch.arange(P, device=t.device)
    crossing = torch.where(cum >= 0.5 * acc_map[ray_index], order, torch.full_like(order, P))
    i = torch.full((n,), P, dtype=torch.long, device=t.device).scatter_reduce(0, ray_index, crossing, "amin")
    i_c = i.clamp(max=P - 1)
    w_i = weights[i_c]
    before = cum[i_c] - w_i
    share = torch.where(w_i > 0, (0.5 * acc_map - before) / torch.where(w_i > 0, w_i, torch.ones_like(w_i)),
                        torch.zeros_like(w_i)).clamp(0, 1)
    same_ray = ray_index[(i_c - 1).clamp(min=0)] == ray_index[i_c]
    t_before = torch.where(same_ray & (i_c > 0), t[(i_c - 1).clamp(min=0)], t[i_c])
    return torch.where(i < P, t_before + (t[i_c] - t_before) * share, torch.zeros_like(acc_map))


def median_termination(weights: torch.Tensor, z_vals: torch.Tensor) -> torch.Tensor:
    """The depth t (N,) at which each ray's accumulated opacity reaches half of its final value.

    weights (N, S) are `compositing_weights` at the sorted sample depths z_vals
    (N, S). As the mean depth sum_i w_i z_i / A does, each weight is placed at
    its sample: the accumulated opacity reaches c_i = w_0 + ... + w_i at z_i,
    and between two samples it is interpolated linearly. With A = c_{S-1}, the
    first i with c_i >= A / 2 gives

        t = z_{i-1} + (z_i - z_{i-1}) (A/2 - c_{i-1}) / w_i      (z_{-1} = z_0, c_{-1} = 0).

    A surface lies between the last empty sample and the first opaque one,
    and the interpolation spreads the first opaque sample's weight over that
    gap, rather than starting it at the sample (which would put every surface
    up to a sample spacing too deep). Unlike the mean, the median is not
    pulled behind the surface by the soft density inside a solid: an
    exponential fall-off of rate sigma puts the mean 1 / sigma past where the
    density starts, the median ln 2 / sigma. A ray without weight gets z_0.
    """
    cum = torch.cumsum(weights, -1)
    half = 0.5 * cum[..., -1:]
    i = torch.searchsorted(cum.contiguous(), half.contiguous()).clamp(max=weights.shape[-1] - 1)
    w_i = torch.gather(weights, -1, i)
    before = torch.gather(cum, -1, i) - w_i
    share = torch.where(w_i > 0, (half - before) / torch.where(w_i > 0, w_i, torch.ones_like(w_i)),
                        torch.zeros_like(w_i)).clamp(0, 1)
    z_i = torch.gather(z_vals, -1, i)
    z_before = torch.gather(torch.cat([z_vals[..., :1], z_vals[..., :-1]], -1), -1, i)
    return (z_before + (z_i - z_before) * share)[..., 0]


def render_rays(ray_batch: torch.Tensor, network_fn: Callable, network_query_fn: Callable,
                N_samples: int, retraw: bool = False, lindisp: bool = False,
                perturb: float = 0.0, N_importance: int = 0, network_fine: Optional[Callable] = None,
                white_bkgd: bool = False, raw_noise_std: float = 0.0, verbose: bool = False,
                pytest: bool = False, coarse_maps: bool = True, median_depth: bool = False,
                density_activation: str = "relu") -> Dict[str, torch.Tensor]:
    """Renders a ray batch (N, 8 or 11): coarse samples, then with
    `N_importance` > 0 as many more drawn from the coarse weights, all of them
    evaluated by the fine network (the coarse one when there is none).

    Returns rgb_map (N, 3), disp_map (N,), acc_map (N,), raw (N, S', 4) with
    `retraw`, and with fine sampling the coarse rgb0, disp0, acc0 (unless
    `coarse_maps` is False: then the coarse pass asks the network for
    densities only, as the fine samples need no more) and z_std (N,), the
    population std of the fine samples' depths. `median_depth` adds t_median (N,),
    the depth where the last pass's accumulated opacity reaches half of its
    final value (`median_termination`).

    `verbose` is the original's keyword, which it never read either; `pytest` replaces every random draw (jitter, density noise, fine
    samples) by the original's fixed ones (`pytest_uniform`). `density_activation`:
    relu (the original) or softplus, see `raw2outputs`.
    """
    rays_o, rays_d = ray_batch[:, 0:3], ray_batch[:, 3:6]
    viewdirs = ray_batch[:, -3:] if ray_batch.shape[-1] > 8 else None
    near, far = ray_batch[:, 6:7], ray_batch[:, 7:8]

    z_vals = sample_along_rays(near, far, N_samples, lindisp, perturb, pytest)
    pts = rays_o[..., None, :] + rays_d[..., None, :] * z_vals[..., :, None]
    ret = {}
    # relu is raw2outputs' default: not passing it keeps a fork's raw2outputs of the original's signature working
    activation = {} if density_activation == "relu" else {"density_activation": density_activation}
    if N_importance > 0 and not coarse_maps:
        sigma = network_query_fn(pts, viewdirs, network_fn, density_only=True)[..., 0]
        weights = compositing_weights(sigma, z_vals, rays_d, raw_noise_std, pytest, density_activation)
    else:
        raw = network_query_fn(pts, viewdirs, network_fn)
        rgb_map, disp_map, acc_map, weights, _ = raw2outputs(raw, z_vals, rays_d, raw_noise_std, white_bkgd, pytest,
                                                             **activation)
        if median_depth and N_importance == 0:
            ret["t_median"] = median_termination(weights, z_vals)
        if N_importance > 0:
            ret.update(rgb0=rgb_map, disp0=disp_map, acc0=acc_map)

    if N_importance > 0:
        z_vals_mid = 0.5 * (z_vals[..., 1:] + z_vals[..., :-1])
        z_samples = helpers.sample_pdf(z_vals_mid, weights[..., 1:-1], N_importance,
                               det=(perturb == 0.0), pytest=pytest).detach()
        z_vals, _ = torch.sort(torch.cat([z_vals, z_samples], -1), -1)
        pts = rays_o[..., None, :] + rays_d[..., None, :] * z_vals[..., :, None]
        raw = network_query_fn(pts, viewdirs, network_fn if network_fine is None else network_fine)
        rgb_map, disp_map, acc_map, weights, _ = raw2outputs(raw, z_vals, rays_d, raw_noise_std, white_bkgd, pytest,
                                                             **activation)
        if median_depth:
            ret["t_median"] = median_termination(weights, z_vals)
        ret["z_std"] = torch.std(z_samples, dim=-1, unbiased=False)

    ret.update(rgb_map=rgb_map, disp_map=disp_map, acc_map=acc_map)
    if retraw:
        ret["raw"] = raw
    return ret


def batchify_rays(rays_flat: torch.Tensor, chunk: int = 1024 * 32, occupancy=None, **kwargs) -> Dict[str, torch.Tensor]:
    """`render_rays` over at most `chunk` rays at a time; outputs concatenated.
    With an `occupancy` sampler (`--sampler occupancy`: nerf/occupancy.py),
    its `render_rays` renders each chunk instead."""
    render_fn = render_rays if occupancy is None else occupancy.render_rays
    chunks = [render_fn(rays_flat[i:i + chunk], **kwargs) for i in range(0, rays_flat.shape[0], chunk)]
    return {k: torch.cat([c[k] for c in chunks], 0) for k in chunks[0]}


def render(H: int, W: int, K, chunk: int = 1024 * 32, rays: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
           c2w: Optional[torch.Tensor] = None, ndc: bool = True, near: float = 0.0, far: float = 1.0,
           use_viewdirs: bool = False, c2w_staticcam: Optional[torch.Tensor] = None,
           **kwargs) -> List:
    """Renders a full image (from `c2w`, (3, 4)) or given rays ((rays_o, rays_d), each (..., 3)).

    View directions are the normalised world directions, taken before NDC
    (from `c2w` even when `c2w_staticcam` places the rays). Returns
    [rgb (..., 3), disp (...), acc (...), extras dict] shaped like the rays.
    """
    if c2w is not None:
        rays_o, rays_d = helpers.get_rays(H, W, K, c2w)
    else:
        rays_o, rays_d = rays

    viewdirs = None
    if use_viewdirs:
        viewdirs = rays_d
        if c2w_staticcam is not None:
            rays_o, rays_d = helpers.get_rays(H, W, K, c2w_staticcam)
        viewdirs = viewdirs / torch.norm(viewdirs, dim=-1, keepdim=True)
        viewdirs = viewdirs.reshape(-1, 3)

    sh = rays_d.shape
    if ndc:
        rays_o, rays_d = helpers.ndc_rays(H, W, geometry.ndc_camera(H, W, K), 1.0, rays_o, rays_d)
    rays_o = rays_o.reshape(-1, 3)
    rays_d = rays_d.reshape(-1, 3)
    near_col = torch.full_like(rays_d[..., :1], near)
    far_col = torch.full_like(rays_d[..., :1], far)
    rays = [rays_o, rays_d, near_col, far_col] + ([viewdirs] if viewdirs is not None else [])
    all_ret = batchify_rays(torch.cat(rays, -1), chunk, **kwargs)
    all_ret = {k: v.reshape(list(sh[:-1]) + list(v.shape[1:])) for k, v in all_ret.items()}

    main_keys = ["rgb_map", "disp_map", "acc_map"]
    return [all_ret[k] for k in main_keys] + [{k: v for k, v in all_ret.items() if k not in main_keys}]


def scaled_intrinsics(K: np.ndarray, render_factor: int) -> np.ndarray:
    """K for an image rendered at 1/render_factor of the size (0 = unchanged)."""
    K = np.array(K, dtype=np.float64)
    if render_factor:
        K[:2] /= render_factor
    return K


class RenderMemory:
    """Renders within the device's memory: `run(render_fn)` calls
    `render_fn(chunk)`; when the device runs out of memory it halves `chunk`
    (rays at once) and the network query's `netchunk` (points at once), warns
    once with the new values, and tries again. Neither size changes a
    rendered value, and the halved sizes stay for later renders."""

    def __init__(self, chunk: int, network_query_fn: Callable):
        self.chunk = chunk
        self.network_query_fn = network_query_fn
        self.warned = False

    def run(self, render_fn: Callable[[int], Any]) -> Any:
        lowered = False
        while True:
            try:
                result = render_fn(self.chunk)
                break
            except RuntimeError as exc:
                netchunk = getattr(self.network_query_fn, "netchunk", 1)
                if not is_out_of_memory(exc) or (self.chunk == 1 and netchunk == 1):
                    raise
                self.chunk = max(1, self.chunk // 2)
                if hasattr(self.network_query_fn, "netchunk"):
                    self.network_query_fn.netchunk = max(1, netchunk // 2)
                free_cached_memory()
                lowered = True
        if lowered and not self.warned:
            log.warning("warning: out of device memory while rendering; continuing with --chunk %d --netchunk %s "
                        "(halved until it fit; the images are the same)",
                        self.chunk, getattr(self.network_query_fn, "netchunk", "unchanged"))
            self.warned = True
        return result


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS a RuntimeError that says so."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_cached_memory() -> None:
    """Hands the CUDA / MPS caching allocator's unused blocks back."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def save_frame(savedir, k: int, rgb: np.ndarray) -> None:
    """Frame k, (H, W, 3) in [0, 1], as `savedir/{k:03d}.png`, written whole
    or not at all (WriteError when the OS refuses)."""
    write_image(Path(savedir) / f"{k:03d}.png", to8b(rgb))


def render_path(render_poses, hwf, K, chunk: int, render_kwargs: dict, gt_imgs=None,
                savedir: Optional[str] = None, render_factor: int = 0, memory: Optional[RenderMemory] = None,
                progress: bool = True, with_depth: bool = False, depth_estimator: str = "median") -> Tuple:
    """Renders every pose in `render_poses` ((P, 3 or 4, 4)) with one progress bar
    (with `progress`; where stderr is no terminal, one line when done).

    `render_factor` N renders at 1/N of the size (the intrinsics scaled to
    match). Frames go to `savedir/{k:03d}.png` when given. `gt_imgs` is kept
    for the original's signature; scoring the frames is nerf/scoring.py's job.
    `memory` carries the chunk sizes from render to render (see
    `RenderMemory`; by default one starting at `chunk`). Returns rgbs
    (P, H, W, 3) and disps (P, H, W) as float32 arrays, and with `with_depth` also
    depths (P, H, W): world units along each camera's viewing axis, NaN where the
    accumulated opacity is below 0.5 (`geometry.depth_map`), of the point where
    the ray's opacity reaches half of its final value (`depth_estimator`
    "median", `median_termination`) or of its mean termination point ("mean").
    """
    H, W, focal = hwf
    if render_factor:
        H, W = H // render_factor, W // render_factor
    K = scaled_intrinsics(K, render_factor)
    coarse_maps = not accepts_density_only(render_kwargs["network_query_fn"])    # the frames need no rgb0
    median_depth = with_depth and depth_estimator == "median"
    memory = memory or RenderMemory(chunk, render_kwargs["network_query_fn"])
    rgbs, disps, depths = [], [], []
    bar = tqdm(render_poses, desc="render", leave=False, dynamic_ncols=True, disable=None if progress else True)
    for k, c2w in enumerate(bar):      # tqdm turns the bar off where stderr is not a terminal
        c2w = torch.as_tensor(c2w, dtype=torch.float32)[:3, :4]
        with torch.no_grad():
            rgb, disp, acc, extras = memory.run(lambda chunk: render(
                int(H), int(W), K, chunk=chunk, c2w=c2w, coarse_maps=coarse_maps,
                **({"median_depth": True} if median_depth else {}), **render_kwargs))
            if with_depth:
                ndc = render_kwargs.get("ndc", True)   # render's default
                depths.append(geometry.depth_map(disp, acc, c2w, K, ndc, t=extras.get("t_median")).cpu().numpy())
        rgbs.append(rgb.cpu().numpy())
        disps.append(disp.cpu().numpy())
        if savedir is not None:
            save_frame(savedir, k, rgbs[-1])
    if progress and bar.disable:        # no terminal: one line instead of the bar
        log.info("rendered %d frames of %dx%d%s", len(rgbs), W, H, f" to {savedir}" if savedir else "")
    if with_depth:
        return np.stack(rgbs, 0), np.stack(disps, 0), np.stack(depths, 0)
    return np.stack(rgbs, 0), np.stack(disps, 0)
