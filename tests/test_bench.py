"""bench.py's accounting: the products it times are the network's products.

The products' bound is only a bound if the probe performs the products the
step performs: every layer of both networks, for as many points, and for a
render the coarse network only up to its density (as render_path asks).
Timings themselves are bench.py's job, not a test's.
"""
from types import SimpleNamespace

import pytest
import torch.nn as nn

import bench
from run_nerf_helpers import NeRF, get_embedder


def network(D, W, skips, viewdirs):
    _, input_ch = get_embedder(10)
    _, input_ch_views = get_embedder(4) if viewdirs else (None, 0)
    return NeRF(D=D, W=W, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5 if not viewdirs else 4,
                skips=skips, use_viewdirs=viewdirs)


def forward_flops(shapes):
    return sum(2 * cin * cout for cin, cout, _ in shapes)


def module_flops(model):
    """2 x in x out over the module's linear layers that a forward pass uses."""
    unused = set() if model.use_viewdirs else set(model.views_linears.modules())
    return sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and m not in unused)


@pytest.mark.parametrize("D, W, skips, viewdirs", [(8, 256, [4], True), (4, 64, [4], True), (4, 64, [2], False)])
def test_product_shapes_are_the_counted_layers(D, W, skips, viewdirs):
    model = network(D, W, skips, viewdirs)
    shapes = bench.layer_shapes(model)
    assert forward_flops(shapes) == module_flops(model)
    # Input gradients: none for the encoded points (nor the skip layer's
    # encoding columns); the views layer's only for the feature.
    assert shapes[0][2] == 0 and all(gin == W for _, _, gin in shapes[1:D])
    if viewdirs:
        views = model.views_linears[0]
        assert (views.in_features, views.out_features, W) in shapes


def test_density_only_shapes_stop_at_sigma():
    model = network(8, 256, [4], True)
    shapes = bench.layer_shapes(model, density_only=True)
    by_hand = 2 * (63 * 256 + 6 * 256 * 256 + (256 + 63) * 256 + 256 * 1)    # 8 layers, the skip's input, alpha
    assert forward_flops(shapes) == by_hand


def test_network_jobs_count_every_sample():
    coarse, fine = network(4, 64, [4], True), network(4, 64, [4], True)
    args = SimpleNamespace(N_samples=32, N_importance=32)
    kw = {"network_fn": coarse, "network_fine": fine}
    assert bench.network_jobs(args, kw, 512, train=True) == [(coarse, 512 * 32, 32, False),
                                                             (fine, 512 * 64, 64, False)]
    assert bench.network_jobs(args, kw, 100, train=False) == [(coarse, 100 * 32, 32, True),
                                                              (fine, 100 * 64, 64, False)]
    per_sample = module_flops(coarse)
    sigma_only = forward_flops(bench.layer_shapes(coarse, density_only=True))
    assert bench.forward_flops_per_ray(args, kw, train=True) == (32 + 64) * per_sample
    assert bench.forward_flops_per_ray(args, kw, train=False) == 32 * sigma_only + 64 * per_sample
    args.N_importance = 0
    assert bench.network_jobs(args, kw, 10, train=False) == [(coarse, 10 * 32, 32, False)]
