"""The fast path of the NeRF MLP: the same network and the same products, less overhead.

`query(model, pts, viewdirs, embed_fn, embeddirs_fn, netchunk)` returns what
`rendering.run_network` returns, raw outputs (N, S, C) for points (N, S, 3)
on N rays, but evaluates the MLP as one autograd node per chunk (`_FusedNeRF`)
that:

- encodes the points straight into the buffer the first layer reads, stored
  transposed so that every sin and cos runs on contiguous rows (no cat);
- encodes each ray's view direction once (not once per sample) and broadcasts
  the encoding over the ray's samples in place;
- lays the buffers out so that the skip layer's input `[pts, h]` and the views
  layer's input `[feature, direction]` are built in place: no concatenation;
- writes every product into reused memory and applies ReLU in place;
- backpropagates by hand: no gradient for the encoded inputs, the weight
  gradients accumulated in place, ReLU's gradient masked in place;
- works through the rows in blocks sized for the CPU's caches (the whole
  chunk at once on a GPU), so that the elementwise work runs on cached data.

Every forward product is the very matrix product the plain path computes on
the same operands (only their memory layout differs), so forward values match
the plain path bit for bit on the CPU wherever both multiply the same rows
together (as in the reference renders; a block or chunk boundary elsewhere
can change a BLAS kernel's rounding of the rows near it). That matters beyond
taste: the fine
samples are drawn by inverting the coarse weights' CDF, which magnifies
rounding differences, so an evaluation that merely rounds differently (say,
the skip layer as two products summed) moves a tenth of the fine pixels of
the reference renders by more than 1e-5. Gradients agree to float32 rounding
(their sums run in another order).

Parameters, their names and the state dict are the `NeRF` module's own.
Memory an evaluation keeps for its backward pass comes from a small pool and
is reused by later steps once its graph is gone (on the CPU every freshly
allocated large tensor costs a page fault per 4 KiB page, every step).

`supports(...)` says when the fast path applies: a `NeRF` whose `forward` is
the library's own, the library's encoders, inputs that need no gradient and
no autocast. Anything else takes the plain path, so forks that pass their own
network or encoder keep working. A fork may also edit `NeRF.forward`, the
`Embedder` or a layer in place, which that check cannot see; so before its
first use for a network and its encoders, `matches_plain_path` evaluates
both paths on a small probe batch and keeps the fast one only where values
and weight gradients agree (one warning line otherwise).
"""
import logging
import math
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from run_nerf_helpers import Embedder, NeRF

__all__ = ["supports", "matches_plain_path", "query", "release_memory", "rows_per_block"]

log = logging.getLogger("nerf")


# --- Reusable memory ---------------------------------------------------------

def _storage_uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Pool:
    """Flat buffers handed out as views and reused once nothing else refers to
    them (their storage is then held only by the pool). A buffer still saved
    by a live autograd graph is never handed out twice."""

    def __init__(self):
        self.buffers: List[torch.Tensor] = []
        self.free_uses: List[int] = []
        try:
            _storage_uses(torch.empty(1))
            self.enabled = True
        except Exception:  # private API gone: allocate every time
            self.enabled = False

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if not self.enabled:
            return torch.empty(numel, dtype=dtype, device=device)
        best = None
        for k, buf in enumerate(self.buffers):
            if (buf.dtype == dtype and buf.device == device and buf.numel() >= numel
                    and _storage_uses(buf) <= self.free_uses[k]
                    and (best is None or buf.numel() < self.buffers[best].numel())):
                best = k
        if best is None:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers.append(buf)
            self.free_uses.append(_storage_uses(buf))
            best = len(self.buffers) - 1
        return self.buffers[best][:numel]

    def clear(self) -> None:
        self.buffers, self.free_uses = [], []


_POOL = _Pool()


def release_memory() -> None:
    """Forgets the pooled buffers (memory still in use stays valid)."""
    _POOL.clear()


def _carve(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> List[torch.Tensor]:
    """Contiguous tensors of the given shapes laid one after another in `flat`."""
    out, at = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        out.append(flat[at:at + n].view(*shape))
        at += n
    return out


def _numel(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


# --- Eligibility and plan ----------------------------------------------------

def _freqs(embed_fn) -> Optional[torch.Tensor]:
    """The encoder's frequencies (empty for the identity), or None if unknown."""
    if (type(embed_fn) is Embedder and embed_fn.input_dims == 3 and embed_fn.include_input
            and embed_fn.periodic_fns == (torch.sin, torch.cos)):
        return embed_fn.freq_bands
    if type(embed_fn) is nn.Identity:
        return torch.zeros(0)
    return None


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def has_hooks(*modules) -> bool:
    """Whether calling any of `modules` (or their submodules) would run a hook:
    a module's forward (pre-)hook or backward hook (say, the old hook-based
    `weight_norm`, or a regulariser recording activations), or one registered
    for all modules. The fused evaluation calls no module, so it skips them."""
    if any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(getattr(m, name, None) for module in modules if isinstance(module, nn.Module)
               for m in module.modules() for name in _MODULE_HOOKS)


def supports(fn, embed_fn, embeddirs_fn, inputs: torch.Tensor, viewdirs: Optional[torch.Tensor]) -> bool:
    """True when `query` computes what the plain path would for these arguments."""
    if not isinstance(fn, NeRF) or type(fn).forward is not NeRF.forward:
        return False
    if has_hooks(fn, embed_fn, embeddirs_fn):
        return False
    if inputs.dim() != 3 or inputs.shape[-1] != 3 or inputs.requires_grad or inputs.numel() == 0:
        return False
    if inputs.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(inputs.device.type):
        return False
    if any(s == fn.D - 1 for s in fn.skips):          # the plain path fails there too
        return False
    freqs = _freqs(embed_fn)
    if freqs is None or 3 + 6 * freqs.numel() != fn.input_ch:
        return False
    if fn.use_viewdirs:
        if viewdirs is None or viewdirs.requires_grad or viewdirs.shape != (inputs.shape[0], 3):
            return False
        dfreqs = _freqs(embeddirs_fn)
        if dfreqs is None or 3 + 6 * dfreqs.numel() != fn.input_ch_views:
            return False
    elif viewdirs is not None and fn.input_ch_views != 0:
        return False
    if any(p.dtype != inputs.dtype or p.device != inputs.device for p in fn.parameters()):
        return False
    return True


PROBE_POINTS = 256     # about this many points (whole rays) in the probe batch
PROBE_RTOL = 1e-4      # allowed difference, relative to each compared tensor's largest value

# network -> {(encoders, dtype, device): verdict}; forgotten with the network
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def matches_plain_path(model: NeRF, embed_fn, embeddirs_fn, inputs: torch.Tensor, viewdirs: Optional[torch.Tensor],
                       netchunk: int, plain: Callable) -> bool:
    """Whether `query` computes what `plain(pts, dirs)` does: the plain path,
    with the model's `forward` and the encoders as they are now, edits made in
    place included. Decided once per model, encoders, dtype and device, on
    the first rays of `inputs` (N, S, 3) and `viewdirs` (N, 3): both paths'
    raw outputs and their gradients for every weight (for a fixed output
    gradient) must agree to PROBE_RTOL. Otherwise logs one warning and returns
    False. The probe changes no state: no random generator advances, no
    `.grad` is written."""
    key = (id(embed_fn), id(embeddirs_fn), inputs.dtype, inputs.device)
    verdicts = _VERDICTS.setdefault(model, {})
    if key not in verdicts:
        try:
            problem = _probe(model, embed_fn, embeddirs_fn, inputs, viewdirs, netchunk, plain)
        except Exception as exc:    # whatever fails in the probe, the plain path is the answer
            problem = f"fails on a probe batch ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})"
        if problem:
            log.warning("warning: fast path: %s %s; using the plain path for this network (--fast_path off "
                        "skips the check)", type(model).__name__, problem)
        verdicts[key] = problem is None
    return verdicts[key]


def _probe(model: NeRF, embed_fn, embeddirs_fn, inputs, viewdirs, netchunk: int, plain: Callable) -> Optional[str]:
    """None when both paths agree on a probe batch, else what differs."""
    n_rays = max(1, PROBE_POINTS // inputs.shape[1])
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    on_cpu = inputs.device.type == "cpu"
    with torch.random.fork_rng([] if on_cpu else [inputs.device], device_type=None if on_cpu else inputs.device.type), \
            torch.inference_mode(False), torch.enable_grad():
        pts = inputs[:n_rays].detach().clone()
        dirs = viewdirs[:n_rays].detach().clone() if viewdirs is not None else None
        want = plain(pts, dirs)
        got = query(model, pts, dirs, embed_fn, embeddirs_fn, netchunk)   # may fail: a layer reshaped in place
        if got.shape != want.shape:
            return f"gives raw outputs of shape {tuple(got.shape)} where its forward gives {tuple(want.shape)}"
        gen = torch.Generator().manual_seed(0)
        grad_out = torch.randn(want.shape, generator=gen, dtype=want.dtype).to(want.device)
        params = [p for _, p in named]
        grads_want = torch.autograd.grad(want, params, grad_out, allow_unused=True) if params else []
        grads_got = torch.autograd.grad(got, params, grad_out, allow_unused=True) if params else []
    zero = torch.zeros_like
    compared = [("raw outputs", got.detach(), want.detach())] + [
        (f"the gradient of {name}", zero(p) if g is None else g, zero(p) if w is None else w)
        for (name, p), g, w in zip(named, grads_got, grads_want)]
    for what, a, b in compared:
        off = _relative_difference(a, b)
        if not off <= PROBE_RTOL:
            return f"differs from its forward and encoders on a probe batch ({what} off by {off:.2g} of its largest value)"
    return None


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|a|, |b|) (0 for two zero tensors)."""
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else 0.0


class _Plan:
    """What the fused evaluation needs to know about the network."""

    def __init__(self, model: NeRF, freqs: torch.Tensor, S: int, block_rows: int, density_only: bool = False):
        self.D, self.W, self.Cp = model.D, model.W, model.input_ch
        self.density_only = density_only     # sigma from the last hidden layer only (with view directions)
        self.recording = torch.is_grad_enabled()
        self.skip_after = set(s for s in model.skips if 0 <= s < model.D - 1)
        self.use_viewdirs = model.use_viewdirs
        self.freqs = freqs
        self.S = S
        self.block_rows = block_rows
        if model.use_viewdirs:
            self.Wv = model.views_linears[0].out_features
            self.Cv = model.input_ch_views
            self.C = 4
        else:
            self.C = model.output_linear.out_features


def _params(model: NeRF) -> List[torch.Tensor]:
    """Weights and biases in the order `_FusedNeRF` reads them."""
    layers = list(model.pts_linears)
    if model.use_viewdirs:
        layers += [model.feature_linear, model.alpha_linear, model.views_linears[0], model.rgb_linear]
    else:
        layers += [model.output_linear]
    return [t for layer in layers for t in (layer.weight, layer.bias)]


def rows_per_block(model: NeRF, S: int, device: torch.device, requested: Optional[int] = None) -> int:
    """Rows (points) per block for rays of S samples: `requested`, else a few
    MiB of activations on a CPU and everything on a GPU; rounded to whole rays
    and a multiple of 64 rows."""
    block = requested
    if not block:
        block = max(4096, (1 << 19) // max(model.W, model.input_ch, 1)) if device.type == "cpu" else 1 << 62
    unit = S * 64 // math.gcd(S, 64)
    return max(unit, block // unit * unit)


# --- The fused network -------------------------------------------------------

def _encode_t(x: torch.Tensor, freqs: torch.Tensor, out_t: torch.Tensor) -> None:
    """Writes Embedder(x) = [x, sin(f0 x), cos(f0 x), ...] transposed: out_t (3 + 6L, B)
    for x (B, 3). The same products f_k x_j and sin/cos as the Embedder, with
    no temporary: the products go into the sine rows, the cosines are taken
    from them, then the sines in place."""
    out_t[:3].copy_(x.t())
    L = freqs.numel()
    if L:
        periodic = out_t[3:].view(L, 2, 3, x.shape[0])
        scaled = periodic[:, 0]
        freqs = freqs.to(device=x.device, dtype=x.dtype, non_blocking=True)
        torch.mul(out_t[:3][None], freqs[:, None, None], out=scaled)
        torch.cos(scaled, out=periodic[:, 1])
        scaled.sin_()


def _relu_grad_(grad: torch.Tensor, out: torch.Tensor) -> None:
    """grad where the ReLU's output is positive, else 0 (in place)."""
    torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def _layout(plan: "_Plan", rows: int):
    """Buffer shapes for `rows` rows: the encoding transposed (Cp, rows), one
    buffer per layer (the layer before a skip gets Cp + W columns, [encoding,
    output]: the skip layer's input as is), then with view directions (and
    colours wanted) [feature, encoded direction] (rows, W + Cv) and the views
    layer's output (rows, Wv)."""
    D, W, Cp = plan.D, plan.W, plan.Cp
    shapes = [(Cp, rows)] + [(rows, Cp + W) if i in plan.skip_after else (rows, W) for i in range(D)]
    if plan.use_viewdirs and not plan.density_only:
        shapes += [(rows, W + plan.Cv), (rows, plan.Wv)]
    return shapes


def _out_cols(plan: "_Plan", i: int, buf: torch.Tensor) -> torch.Tensor:
    """Layer i's output columns within its buffer."""
    return buf[:, plan.Cp:] if i in plan.skip_after else buf


class _FusedNeRF(torch.autograd.Function):
    """raw (M, C) for points pts (M, 3), M = R rays x S samples, encoded on the
    fly, and per-ray encoded view directions venc (R, Cv) (None without
    viewdirs); with `plan.density_only` (no gradients then) sigma (M, 1).
    Each forward product is the plain path's, on the same operands."""

    @staticmethod
    def forward(ctx, plan: "_Plan", pts: torch.Tensor, venc: Optional[torch.Tensor], *params):
        D, W, Cp, S = plan.D, plan.W, plan.Cp, plan.S
        M = pts.shape[0]
        # Keep the activations only for a backward pass: `needs_input_grad`
        # is set under no_grad too, so ask whether a graph is being recorded.
        saving = plan.recording and any(ctx.needs_input_grad[3:])
        if saving and plan.density_only:
            raise RuntimeError("fast_mlp: density_only evaluations have no backward pass")
        w, b = params[0::2], params[1::2]
        out = torch.empty(M, 1 if plan.density_only else plan.C, dtype=pts.dtype, device=pts.device)

        block = plan.block_rows
        shapes = _layout(plan, M if saving else min(M, block))
        bufs = _carve(_POOL.take(_numel(shapes), pts.dtype, pts.device), shapes)
        sigma = None
        if plan.use_viewdirs and not plan.density_only:
            sigma = torch.empty(min(M, block), 1, dtype=pts.dtype, device=pts.device)
        for a in range(0, M, block):
            e = min(a + block, M)
            sl = slice(a, e) if saving else slice(0, e - a)
            enc_t = bufs[0][:, sl]
            _encode_t(pts[a:e], plan.freqs, enc_t)
            x = enc_t.t()
            for i in range(D):
                buf = bufs[1 + i][sl]
                o = _out_cols(plan, i, buf)
                torch.addmm(b[i], x, w[i].t(), out=o)
                o.relu_()
                if i in plan.skip_after:
                    buf[:, :Cp].copy_(enc_t.t())
                x = buf
            if plan.density_only:
                torch.addmm(b[D + 1], x, w[D + 1].t(), out=out[a:e])
            elif plan.use_viewdirs:
                wf, wa, wv, wr = w[D:D + 4]
                bf, ba, bv, br = b[D:D + 4]
                fv, v = bufs[-2][sl], bufs[-1][sl]
                # sigma into contiguous memory, then its column: MKL rounds the
                # last rows of a one-column product into a strided column
                # differently, and sigma steers the fine samples.
                torch.addmm(ba, x, wa.t(), out=sigma[:e - a])
                out[a:e, 3:4].copy_(sigma[:e - a])
                torch.addmm(bf, x, wf.t(), out=fv[:, :W])
                fv[:, W:].view(-1, S, plan.Cv).copy_(venc[a // S:e // S, None, :])
                torch.addmm(bv, fv, wv.t(), out=v)
                v.relu_()
                torch.addmm(br, v, wr.t(), out=out[a:e, :3])
            else:
                torch.addmm(b[D], x, w[D].t(), out=out[a:e])

        if saving:
            ctx.plan = plan
            ctx.save_for_backward(pts, venc, *params, *bufs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        plan = ctx.plan
        D, W, Cp = plan.D, plan.W, plan.Cp
        n_params = len(ctx.needs_input_grad) - 3
        saved = ctx.saved_tensors
        params, bufs = saved[2:2 + n_params], saved[2 + n_params:]
        w, b = params[0::2], params[1::2]
        M = saved[0].shape[0]
        grad_out = grad_out.contiguous()

        gw = [torch.zeros_like(t) for t in w]
        gb = [torch.zeros_like(t) for t in b]
        block = plan.block_rows
        rows = min(M, block)
        shapes = [(rows, W), (rows, W)]
        if plan.use_viewdirs:
            wf, wa, wv, wr = w[D:D + 4]
            w_fa = torch.cat([wf, wa], 0)                                   # (W + 1, W)
            gw_fa = torch.zeros_like(w_fa)
            gb_fa = torch.zeros(W + 1, dtype=w_fa.dtype, device=w_fa.device)
            shapes += [(rows, W + 1), (rows, plan.Wv)]
        scratch = _carve(_POOL.take(_numel(shapes), grad_out.dtype, grad_out.device), shapes)
        ones = torch.ones(rows, dtype=grad_out.dtype, device=grad_out.device)    # bias gradients: row sums

        for a in range(0, M, block):
            e = min(a + block, M)
            n = e - a
            x_last = bufs[D][a:e]
            dh = scratch[0][:n]
            if plan.use_viewdirs:
                dfa, dv = scratch[2][:n], scratch[3][:n]
                g_rgb = grad_out[a:e, :3]
                v, fv = bufs[-1][a:e], bufs[-2][a:e]
                gw[D + 3].addmm_(g_rgb.t(), v)
                gb[D + 3].addmv_(g_rgb.t(), ones[:n])
                torch.mm(g_rgb, wr, out=dv)
                _relu_grad_(dv, v)
                gw[D + 2].addmm_(dv.t(), fv)
                gb[D + 2].addmv_(dv.t(), ones[:n])
                torch.mm(dv, wv[:, :W], out=dfa[:, :W])
                dfa[:, W].copy_(grad_out[a:e, 3])
                gw_fa.addmm_(dfa.t(), x_last)
                gb_fa.addmv_(dfa.t(), ones[:n])
                torch.mm(dfa, w_fa, out=dh)
            else:
                g = grad_out[a:e]
                gw[D].addmm_(g.t(), x_last)
                gb[D].addmv_(g.t(), ones[:n])
                torch.mm(g, w[D], out=dh)
            for i in range(D - 1, -1, -1):
                _relu_grad_(dh, _out_cols(plan, i, bufs[1 + i][a:e]))
                gb[i].addmv_(dh.t(), ones[:n])
                if i == 0:
                    gw[0].addmm_(dh.t(), bufs[0][:, a:e].t())
                    break
                gw[i].addmm_(dh.t(), bufs[i][a:e])        # layer i's input: layer i-1's buffer
                nxt = scratch[(D - i) % 2][:n]
                w_h = w[i][:, Cp:] if (i - 1) in plan.skip_after else w[i]
                torch.mm(dh, w_h, out=nxt)
                dh = nxt

        if plan.use_viewdirs:
            gw[D].copy_(gw_fa[:W])
            gw[D + 1].copy_(gw_fa[W:])
            gb[D].copy_(gb_fa[:W])
            gb[D + 1].copy_(gb_fa[W:])
        grads = [(gw if k % 2 == 0 else gb)[k // 2] if ctx.needs_input_grad[3 + k] else None
                 for k in range(n_params)]
        return (None, None, None, *grads)


def query(model: NeRF, inputs: torch.Tensor, viewdirs: Optional[torch.Tensor], embed_fn, embeddirs_fn,
          netchunk: int = 1024 * 64, block_rows: Optional[int] = None, density_only: bool = False) -> torch.Tensor:
    """`run_network` for a `NeRF` (check `supports` first): raw (N, S, C) for
    points (N, S, 3) and view directions (N, 3), at most about `netchunk`
    points (whole rays) per evaluation. `density_only`: sigma (N, S, 1)
    alone, skipping the colour layers; with view directions that evaluation
    has no backward pass (`run_network` sends gradient-recording calls to
    the plain path)."""
    N, S, _ = inputs.shape
    if density_only and not model.use_viewdirs:     # one output layer computes every channel
        return query(model, inputs, viewdirs, embed_fn, embeddirs_fn, netchunk, block_rows)[..., 3:4]
    venc = embeddirs_fn(viewdirs) if model.use_viewdirs and not density_only else None
    plan = _Plan(model, _freqs(embed_fn), S, rows_per_block(model, S, inputs.device, block_rows), density_only)
    params = _params(model)
    rays_per_chunk = max(1, netchunk // S)
    outs = []
    for r in range(0, N, rays_per_chunk):
        pts = inputs[r:r + rays_per_chunk].reshape(-1, 3)
        v = venc[r:r + rays_per_chunk] if venc is not None else None
        outs.append(_FusedNeRF.apply(plan, pts, v, *params))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.view(N, S, -1)
