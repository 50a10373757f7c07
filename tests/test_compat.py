"""Forks and the original's users: nothing they relied on breaks, nothing
they change is silently ignored (docs/compatibility.md lists each guarantee
with its test here).

- The fast path follows in-place edits of `NeRF.forward`, the `Embedder` and
  the layers: a run that uses it after such an edit trains exactly as one
  with `--fast_path off`; an unedited model still takes it.
- A run folder's args.txt works as a config: it reads back every flag, and
  renders, resumes and starts a fresh run under a new --expname.
- --render_test during training, a repeated --render_only, a missing scene.
- The original's public names and keywords, checked against independent
  computations (NumPy draws, a float64 MLP of the Keras layout, loops).

Scenes are the tiny synthetic ones of test_robustness; networks are 2 x 16.
"""
import logging
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nerf import data_checks, fast_mlp, flags, geometry, rendering
import run_nerf
import run_nerf_helpers
from conftest import REPO, ROUNDING_ATOL
from nerf.ray_batches import RAYS_RTOL, ImageRaySampler, RayBatcher
from nerf.errors import DataError
from run_nerf_helpers import Embedder, NeRF, get_embedder, sample_pdf
from test_robustness import assert_same_weights, blender_argv, make_blender_scene, weights

# coarse + fine networks with view directions: every layer of the fast path
VIEWDIRS = ["--N_importance", "4", "--use_viewdirs"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return make_blender_scene(tmp_path_factory.mktemp("scene") / "blender")


def train(scene: Path, basedir: Path, *extra: str, steps: int = 3) -> dict:
    """A short run; returns its last checkpoint's weights and Adam state."""
    assert run_nerf.main(blender_argv(scene, basedir, "--N_iters", str(steps), "--i_weights", str(steps),
                                      *VIEWDIRS, *extra)) == 0
    return weights(basedir / "run" / f"{steps:06d}.tar")


def fast_path_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if "warning: fast path" in r.getMessage()]


@pytest.fixture
def count_fast_queries(monkeypatch) -> dict:
    """Counts the fused evaluations (the probe's own excluded)."""
    calls = {"n": 0}
    original, probe = fast_mlp.query, fast_mlp._probe

    def query(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    def uncounted_probe(*args, **kwargs):
        before = calls["n"]
        try:
            return probe(*args, **kwargs)
        finally:
            calls["n"] = before

    monkeypatch.setattr(fast_mlp, "query", query)
    monkeypatch.setattr(fast_mlp, "_probe", uncounted_probe)
    return calls


# --- The fast path follows the code --------------------------------------------------

def test_unedited_model_takes_the_fast_path_and_off_rules_it_out(scene, tmp_path, count_fast_queries, caplog):
    with caplog.at_level(logging.INFO, logger="nerf"):
        fast = train(scene, tmp_path / "auto")
    assert count_fast_queries["n"] > 0
    assert fast_path_warnings(caplog) == []
    count_fast_queries["n"] = 0
    plain = train(scene, tmp_path / "off", "--fast_path", "off")
    assert count_fast_queries["n"] == 0
    for part in ("fn", "fine"):      # the same training, to float32 rounding of the gradient sums
        for k in fast[part]:
            torch.testing.assert_close(fast[part][k], plain[part][k], rtol=0, atol=ROUNDING_ATOL)


def leaky_forward(self, x):
    """A fork's edit of NeRF.forward: leaky ReLU in the hidden layers."""
    input_pts, input_views = torch.split(x, [self.input_ch, self.input_ch_views], dim=-1)
    h = input_pts
    for i, layer in enumerate(self.pts_linears):
        h = F.leaky_relu(layer(h), 0.1)
        if i in self.skips:
            h = torch.cat([input_pts, h], -1)
    alpha = self.alpha_linear(h)
    h = torch.cat([self.feature_linear(h), input_views], -1)
    for layer in self.views_linears:
        h = F.relu(layer(h))
    return torch.cat([self.rgb_linear(h), alpha], -1)


def half_frequency(original):
    def edited(self, inputs):      # a fork's edit of the Embedder: every frequency halved
        return original(self, inputs * 0.5)
    return edited


def official_views_layers(original):
    def __init__(self, *args, **kwargs):   # the original's commented-out "official" views branch, D//2 more layers
        original(self, *args, **kwargs)
        self.views_linears.extend(nn.Linear(self.W // 2, self.W // 2) for _ in range(self.D // 2))
    return __init__


EDITS = {
    "NeRF.forward": lambda mp: mp.setattr(NeRF, "forward", leaky_forward),
    "Embedder.embed": lambda mp: mp.setattr(Embedder, "embed", half_frequency(Embedder.embed)),
    "Embedder.forward": lambda mp: mp.setattr(Embedder, "forward", half_frequency(Embedder.forward)),
    "extra views layer": lambda mp: mp.setattr(NeRF, "__init__", official_views_layers(NeRF.__init__)),
}


@pytest.mark.parametrize("edit", EDITS)
def test_edit_in_place_is_followed(edit, scene, tmp_path, monkeypatch, count_fast_queries, caplog):
    """After the edit the default run trains exactly as --fast_path off does
    (the plain path, which calls the edited code), says so once per network,
    and differs from the unedited model."""
    unedited = train(scene, tmp_path / "unedited", "--fast_path", "off")
    EDITS[edit](monkeypatch)
    with caplog.at_level(logging.INFO, logger="nerf"):
        auto = train(scene, tmp_path / "auto")
    assert count_fast_queries["n"] == 0
    assert len(fast_path_warnings(caplog)) == 2                 # coarse and fine network
    assert_same_weights(auto, train(scene, tmp_path / "off", "--fast_path", "off"))
    assert any(not torch.equal(auto["fn"][k], unedited["fn"][k]) for k in unedited["fn"])


def test_layer_reshaped_in_place_that_the_fast_path_fits_keeps_it(scene, tmp_path, monkeypatch, count_fast_queries,
                                                                  caplog):
    """A views layer of width W instead of W // 2: the fused evaluation reads
    the widths from the layers, agrees with forward, and stays in use."""
    original = NeRF.__init__

    def wide_views(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.views_linears[0] = nn.Linear(self.input_ch_views + self.W, self.W)
        self.rgb_linear = nn.Linear(self.W, 3)

    monkeypatch.setattr(NeRF, "__init__", wide_views)
    with caplog.at_level(logging.INFO, logger="nerf"):
        auto = train(scene, tmp_path / "auto")
    assert count_fast_queries["n"] > 0 and fast_path_warnings(caplog) == []
    assert auto["fn"]["views_linears.0.weight"].shape[0] == 16
    plain = train(scene, tmp_path / "off", "--fast_path", "off")
    for k in auto["fn"]:
        torch.testing.assert_close(auto["fn"][k], plain["fn"][k], rtol=0, atol=ROUNDING_ATOL)


def test_probe_changes_no_random_state_and_no_grad():
    """The probe runs forward code that may draw random numbers (here a
    fork's dropout) and computes gradients: neither leaves a trace."""
    embed, input_ch = get_embedder(2)
    embeddirs, input_ch_views = get_embedder(1)
    net = NeRF(D=2, W=16, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5, use_viewdirs=True)
    forward = NeRF.forward
    net.forward = lambda x: F.dropout(forward(net, x), 0.5)
    pts, dirs = torch.rand(4, 8, 3), F.normalize(torch.rand(4, 3), dim=-1)
    state = torch.get_rng_state()

    def plain(p, d):
        return rendering.plain_network(p, d, net, embed, embeddirs, 1024)

    assert not fast_mlp.matches_plain_path(net, embed, embeddirs, pts, dirs, 1024, plain)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in net.parameters())


# --- args.txt as a config ------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, scene) -> Path:
    """A 4-step run (000002.tar, 000004.tar) made from the command line alone."""
    basedir = tmp_path_factory.mktemp("logs")
    train(scene, basedir, "--i_weights", "2", steps=4)
    return basedir / "run"


def test_args_txt_reads_back_every_flag(run_dir):
    text = (run_dir / "args.txt").read_text()
    assert "ft_path = None\n" in text and "config = None\n" in text and "use_viewdirs = True\n" in text
    parser = run_nerf.config_parser()
    again = flags.parse_args(parser, ["--config", str(run_dir / "args.txt")])
    written = dict(line.split(" = ", 1) for line in text.splitlines())
    assert sorted(vars(again)) == sorted(written)
    for key, value in vars(again).items():
        if key != "config":
            assert str(value) == written[key], key
    assert again.ft_path is None
    assert flags.parse_args(parser, ["--ft_path", "None"]).ft_path is None


def test_args_txt_renders(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    assert run_nerf.main(["--config", str(tmp_path / "run" / "args.txt"), "--basedir", str(tmp_path),
                          "--render_only", "--render_factor", "2"]) == 0
    frames = sorted((tmp_path / "run" / "renderonly_path_000004").glob("*.png"))
    assert len(frames) == 40 and imageio.imread(frames[0]).shape == (8, 8, 3)


def test_args_txt_resumes(run_dir, tmp_path, scene):
    """Resuming from args.txt continues at step 5 exactly as a run straight
    to step 6 from the same command line."""
    resumed = tmp_path / "resumed"
    (resumed / "run").mkdir(parents=True)
    for name in ("000004.tar", "args.txt"):
        (resumed / "run" / name).write_bytes((run_dir / name).read_bytes())
    assert run_nerf.main(["--config", str(resumed / "run" / "args.txt"), "--basedir", str(resumed),
                          "--N_iters", "6", "--i_weights", "6"]) == 0
    assert sorted(p.name for p in (resumed / "run").glob("*.tar")) == ["000004.tar", "000006.tar"]
    straight = train(scene, tmp_path / "straight", "--i_weights", "6", steps=6)
    got = weights(resumed / "run" / "000006.tar")
    for part in ("fn", "fine"):
        for k in straight[part]:
            assert torch.equal(got[part][k], straight[part][k]), k


def test_args_txt_starts_a_fresh_run_under_a_new_expname(run_dir, tmp_path):
    """Every setting comes back: a fresh run from args.txt reproduces the
    original run's checkpoint bit for bit."""
    assert run_nerf.main(["--config", str(run_dir / "args.txt"), "--basedir", str(tmp_path),
                          "--expname", "again"]) == 0
    assert sorted(p.name for p in (tmp_path / "again").glob("*.tar")) == ["000002.tar", "000004.tar"]
    assert_same_weights(weights(tmp_path / "again" / "000004.tar"), weights(run_dir / "000004.tar"))
    assert (tmp_path / "again" / "config.txt").read_text() == (run_dir / "args.txt").read_text()


# --- Outputs and messages ------------------------------------------------------------

def test_render_test_switches_the_training_videos_to_the_test_views(scene, tmp_path):
    for extra, frames in (([], 40), (["--render_test"], 2)):
        basedir = tmp_path / str(frames)
        train(scene, basedir, "--i_video", "1", *extra, steps=1)
        for kind in ("rgb", "disp"):
            with imageio.get_reader(basedir / "run" / f"run_spiral_000001_{kind}.mp4") as reader:
                assert reader.count_frames() == frames


@pytest.mark.parametrize("config, hint", [
    ("fern", "run `bash download_example_data.sh`"),
    ("lego", "run `bash download_example_data.sh`"),
    ("flower", "flower is in nerf_llff_data.zip of the NeRF authors' data release (see README): unzip it into data"),
    ("ship", "ship is in nerf_synthetic.zip of the NeRF authors' data release (see README): unzip it into data"),
])
def test_missing_scene_of_a_shipped_config_says_how_to_get_it(config, hint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_nerf.main(["--config", str(REPO / "configs" / f"{config}.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data/nerf_")
    assert "data folder does not exist; " + hint in err
    assert not (tmp_path / "logs").exists()


def test_missing_folder_of_your_own_scene_has_no_download_hint(tmp_path):
    args = run_nerf.config_parser().parse_args(["--datadir", str(tmp_path / "myscene")])
    with pytest.raises(DataError) as err:
        data_checks.check_data(args)
    assert err.value.what == "data folder does not exist"


# --- The original's names and keywords ----------------------------------------------

def tiny_render_kwargs(seed=0):
    torch.manual_seed(seed)
    embed, input_ch = get_embedder(2)
    embeddirs, input_ch_views = get_embedder(1)
    nets = [NeRF(D=2, W=16, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5, skips=[0],
                 use_viewdirs=True) for _ in range(2)]
    for net in nets:                 # dense enough that the samples' depths matter
        with torch.no_grad():
            net.alpha_linear.bias.fill_(1.0)

    def network_query_fn(inputs, viewdirs, network_fn):   # the original's three-argument form
        return run_nerf.run_network(inputs, viewdirs, network_fn, embed, embeddirs, 64)

    return dict(network_query_fn=network_query_fn, network_fn=nets[0], network_fine=nets[1], N_samples=8,
                N_importance=8, use_viewdirs=True, white_bkgd=True, ndc=False, near=2.0, far=6.0)


def rays(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, 4.0]), \
        torch.randn(n, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, -1.0])


def test_render_takes_verbose_and_pytest():
    kwargs = tiny_render_kwargs()
    with torch.no_grad():
        plain = run_nerf.render(1, 6, np.eye(3), chunk=4, rays=rays(), perturb=0.0, **kwargs)
        verbose = run_nerf.render(1, 6, np.eye(3), chunk=4, rays=rays(), perturb=0.0, verbose=True, **kwargs)
        # pytest: the jitter, noise and fine samples are the original's fixed draws, whatever torch's generator says
        fixed = [run_nerf.render(1, 6, np.eye(3), chunk=4, rays=rays(), perturb=1.0, raw_noise_std=1.0,
                                 pytest=True, **kwargs)[0] for _ in range(2)]
        jittered = run_nerf.render(1, 6, np.eye(3), chunk=4, rays=rays(), perturb=1.0, **kwargs)[0]
    assert torch.equal(plain[0], verbose[0]) and torch.equal(plain[1], verbose[1])
    assert torch.equal(fixed[0], fixed[1])
    assert not torch.equal(fixed[0], plain[0]) and not torch.equal(jittered, plain[0])


def test_render_rays_takes_the_original_positional_arguments():
    kw = tiny_render_kwargs()
    rays_o, rays_d = rays()
    viewdirs = F.normalize(rays_d, dim=-1)
    batch = torch.cat([rays_o, rays_d, torch.full((6, 1), 2.0), torch.full((6, 1), 6.0), viewdirs], -1)
    with torch.no_grad():
        by_position = rendering.render_rays(batch, kw["network_fn"], kw["network_query_fn"], 8, True, False, 0.0, 8,
                                            kw["network_fine"], True, 0.0, True, False)
        by_name = rendering.render_rays(batch, network_fn=kw["network_fn"], network_query_fn=kw["network_query_fn"],
                                        N_samples=8, retraw=True, perturb=0.0, N_importance=8,
                                        network_fine=kw["network_fine"], white_bkgd=True)
    assert by_position.keys() == by_name.keys() >= {"rgb_map", "raw", "rgb0", "z_std"}
    for k in by_name:
        assert torch.equal(by_position[k], by_name[k]), k


def test_raw2outputs_pytest_noise_is_the_originals_numpy_draw():
    g = torch.Generator().manual_seed(2)
    raw, z = torch.randn(5, 7, 4, generator=g), torch.sort(torch.rand(5, 7, generator=g) * 4 + 2, -1)[0]
    rays_d = torch.randn(5, 3, generator=g)
    noisy = run_nerf.raw2outputs(raw, z, rays_d, 0.5, True, True)      # positional pytest, as forks call it
    noise = np.random.RandomState(0).rand(5, 7) * 0.5                  # the original: np.random.rand, uniform
    shifted = raw.clone()
    shifted[..., 3] += torch.as_tensor(noise, dtype=torch.float32)
    expected = run_nerf.raw2outputs(shifted, z, rays_d, 0.0, True)
    for a, b in zip(noisy, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sample_pdf_takes_pytest_positionally():
    g = torch.Generator().manual_seed(3)
    bins = torch.sort(torch.rand(4, 9, generator=g), -1)[0]
    w = torch.rand(4, 8, generator=g)
    got = sample_pdf(bins, w, 5, False, True)
    u = torch.as_tensor(np.random.RandomState(0).rand(4, 5), dtype=torch.float32)
    torch.testing.assert_close(got, sample_pdf(bins, w, 5, u=u), rtol=0, atol=0)
    assert torch.equal(sample_pdf(bins, w, 5, True, True), sample_pdf(bins, w, 5, True))


def test_run_nerf_module_names():
    from run_nerf import DEBUG, batchify, device
    assert isinstance(device, torch.device) and DEBUG is False
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return x * 2
    x = torch.arange(10.0)[:, None]
    assert torch.equal(batchify(fn, 3)(x), x * 2) and seen == [3, 3, 3, 1]
    assert batchify(fn, None) is fn
    for name in ("run_network", "batchify_rays", "render", "render_path", "create_nerf", "raw2outputs",
                 "render_rays", "config_parser", "train", "img2mse", "mse2psnr", "to8b", "get_embedder", "NeRF",
                 "get_rays", "get_rays_np", "ndc_rays", "sample_pdf"):
        assert callable(getattr(run_nerf, name)), name
    with pytest.raises(AttributeError):
        run_nerf.no_such_name


def test_create_nerf_and_render_path_with_the_original_arguments(tmp_path):
    args = run_nerf.config_parser().parse_args(["--basedir", str(tmp_path), "--expname", "x", "--netdepth", "2",
                                                "--netwidth", "16", "--netdepth_fine", "2", "--netwidth_fine", "16",
                                                "--multires", "2", "--multires_views", "1", "--N_samples", "4",
                                                "--N_importance", "4", "--use_viewdirs", "--no_ndc"])
    render_kwargs_train, render_kwargs_test, start, grad_vars, optimizer = run_nerf.create_nerf(args)
    assert start == 0 and len(grad_vars) == len(list(optimizer.param_groups[0]["params"]))
    render_kwargs_test.update(near=2.0, far=6.0)
    poses = torch.eye(4)[None, :3].repeat(2, 1, 1)
    poses[:, 2, 3] = 4.0
    rgbs, disps = run_nerf.render_path(poses, [8, 6, 5.0], np.array([[5.0, 0, 3], [0, 5.0, 4], [0, 0, 1]]), 1024,
                                       render_kwargs_test, None, str(tmp_path), 2)
    assert rgbs.shape == (2, 4, 3, 3) and disps.shape == (2, 4, 3)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000.png", "001.png"]


def test_embedder_takes_the_original_keywords():
    x = torch.rand(5, 3, dtype=torch.float64) * 4 - 2
    original = Embedder(include_input=True, input_dims=3, max_freq_log2=3, num_freqs=4, log_sampling=True,
                        periodic_fns=[torch.sin, torch.cos])
    loop = torch.cat([x] + [fn(x * 2.0 ** k) for k in range(4) for fn in (torch.sin, torch.cos)], -1)
    assert original.out_dim == 27
    torch.testing.assert_close(original.embed(x), loop, rtol=0, atol=0)
    torch.testing.assert_close(get_embedder(4)[0](x), loop, rtol=0, atol=0)

    linear = Embedder(include_input=False, input_dims=2, max_freq_log2=2, num_freqs=3, log_sampling=False,
                      periodic_fns=[torch.sin])
    y = x[:, :2]
    assert linear.out_dim == 6
    torch.testing.assert_close(linear.embed(y), torch.cat([torch.sin(y * f) for f in (1.0, 2.5, 4.0)], -1))
    net = NeRF(D=2, W=8, input_ch=6, input_ch_views=0, output_ch=4)
    assert not fast_mlp.supports(net, linear, None, torch.zeros(1, 1, 3), None)


def test_load_weights_from_keras_matches_a_float64_keras_mlp():
    """The Keras layout: kernels (in, out), layers in the order pts 0..D-1,
    feature, views, rgb, alpha; y = x @ kernel + bias."""
    D, W, ch, ch_v = 3, 8, 5, 4
    rng = np.random.default_rng(0)
    shapes = [(ch, W), (W + ch, W), (W, W), (W, W), (W + ch_v, W // 2), (W // 2, 3), (W, 1)]
    keras = [a for s in shapes for a in (rng.normal(size=s).astype(np.float32),
                                         rng.normal(size=s[1]).astype(np.float32))]
    net = NeRF(D=D, W=W, input_ch=ch, input_ch_views=ch_v, skips=[0], use_viewdirs=True)
    net.load_weights_from_keras(keras)
    x = rng.normal(size=(6, ch + ch_v))

    def dense(h, k):
        return h @ keras[2 * k].astype(np.float64) + keras[2 * k + 1]
    pts, views = x[:, :ch], x[:, ch:]
    h = np.maximum(dense(pts, 0), 0)
    h = np.concatenate([pts, h], -1)                      # skip after layer 0
    for k in (1, 2):
        h = np.maximum(dense(h, k), 0)
    alpha = dense(h, 6)
    v = np.maximum(dense(np.concatenate([dense(h, 3), views], -1), 4), 0)
    expected = np.concatenate([dense(v, 5), alpha], -1)
    with torch.no_grad():
        got = net(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    # float32 against float64: measured 3e-8 to 5.5e-7 of the largest output over 20 seeds (about 5 float32
    # roundings); a kernel transposed or a layer misplaced is off by the order of the outputs themselves.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="use_viewdirs"):
        NeRF(D=D, W=W, input_ch=ch, use_viewdirs=False).load_weights_from_keras(keras)


# --- Assignments, hooks and ray edits are followed (issue 19, item 3) ----------------

def recording(original, calls: list):
    def replacement(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    return replacement


@pytest.mark.parametrize("module, name", [(run_nerf, "raw2outputs"), (run_nerf, "sample_pdf"),
                                          (run_nerf, "render_rays"), (run_nerf, "get_rays"),
                                          (run_nerf_helpers, "sample_pdf"), (run_nerf_helpers, "get_rays")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_assigning_a_function_reaches_the_rendering_code(module, name, monkeypatch):
    """`run_nerf.raw2outputs = f` (and the others, the original's run_nerf
    names) and `run_nerf_helpers.sample_pdf = f` are called by render; undoing
    the assignment undoes it there too."""
    kwargs = tiny_render_kwargs()
    with torch.no_grad():
        before = run_nerf.render(3, 4, np.diag([2.0, 2.0, 1.0]), chunk=5, c2w=torch.eye(4)[:3], perturb=0.0, **kwargs)
    original, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, recording(original, calls))
    with torch.no_grad():
        after = run_nerf.render(3, 4, np.diag([2.0, 2.0, 1.0]), chunk=5, c2w=torch.eye(4)[:3], perturb=0.0, **kwargs)
    assert calls and torch.equal(before[0], after[0])
    monkeypatch.undo()
    assert getattr(rendering, name, original) is original and getattr(run_nerf_helpers, name, original) is original


def test_a_forks_ndc_rays_of_the_original_signature_still_gets_a_focal_length(monkeypatch):
    """A centred camera calls ndc_rays(H, W, focal, ...) with the focal length
    as a number, as the original did, so a fork's edit written for a number
    keeps working; an off-centre principal point passes K instead."""
    kwargs = tiny_render_kwargs()
    original, focals = run_nerf_helpers.ndc_rays, []

    def fork_edit(H, W, focal, near, rays_o, rays_d):
        focals.append(focal)
        return original(H, W, focal, near, rays_o, rays_d)

    monkeypatch.setattr(run_nerf, "ndc_rays", fork_edit)
    c2w = torch.eye(4)[:3]
    for K in (np.array([[2.0, 0, 2.0], [0, 2.0, 1.5], [0, 0, 1]]), np.array([[2.0, 0, 1.0], [0, 2.0, 1.5], [0, 0, 1]])):
        with torch.no_grad():
            run_nerf.render(3, 4, K, chunk=5, c2w=c2w, perturb=0.0, **{**kwargs, "ndc": True})
    assert np.ndim(focals[0]) == 0 and focals[0] == 2.0
    assert np.ndim(focals[1]) == 2 and focals[1][0][2] == 1.0
    # depth maps and meshes map their rays through the same, edited ndc_rays
    rays_o, rays_d = torch.zeros(2, 3), torch.tensor([[0.1, 0.0, -1.0], [0.0, 0.2, -1.0]])
    geometry.render_space_rays(rays_o, rays_d, True, (3, 4, np.array([[2.0, 0, 2.0], [0, 2.0, 1.5], [0, 0, 1]])))
    assert len(focals) == 3 and np.ndim(focals[2]) == 0 and focals[2] == 2.0


def half_pixel(original):
    """A fork's edit of get_rays / get_rays_np: rays through the pixel centres (i + 0.5, j + 0.5)."""
    def edited(H, W, K, c2w):
        K = K.clone() if torch.is_tensor(K) else np.array(K, dtype=np.float64)
        K[0][2] -= 0.5
        K[1][2] -= 0.5
        return original(H, W, K, c2w)
    return edited


def small_cameras(n=4, H=6, W=8, seed=0):
    rng = np.random.default_rng(seed)
    poses = np.zeros((n, 3, 5), np.float32)
    for k in range(n):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        poses[k, :, :3], poses[k, :, 3] = q, rng.normal(size=3)
    images = rng.random((n, H, W, 3), dtype=np.float32)
    return images, poses, np.array([[5.0, 0, W / 2], [0, 5.0, H / 2], [0, 0, 1]]), H, W


@pytest.mark.parametrize("edited", [False, True], ids=["unedited", "half_pixel"])
def test_training_rays_follow_an_edit_of_get_rays_np_and_get_rays(edited, monkeypatch, caplog):
    """Ray batching takes get_rays_np's rays, one image a step get_rays' (as
    the original did), edited or not; only an edit costs memory and a warning."""
    images, poses, K, H, W = small_cameras()
    if edited:
        for name in ("get_rays", "get_rays_np"):
            monkeypatch.setattr(run_nerf_helpers, name, half_pixel(getattr(run_nerf_helpers, name)))
    with caplog.at_level(logging.INFO, logger="nerf"):
        batcher = RayBatcher(images, poses, [0, 1, 2, 3], H, W, K, 16, torch.device("cpu"))
        sampler = ImageRaySampler(images, poses, [0, 1, 2, 3], H, W, K, 16, 0, 0.5, torch.device("cpu"))
    assert len([r for r in caplog.records if "warning: training rays" in r.getMessage()]) == (2 if edited else 0)
    expected = torch.from_numpy(np.stack([np.stack(run_nerf_helpers.get_rays_np(H, W, K, p[:3, :4]), 0)
                                          for p in poses], 1).astype(np.float32)).reshape(2, -1, 3)
    for step in range(1, 6):
        index = batcher._index(batcher.i_batch).long()
        batch_rays, target = batcher(step)
        # get_rays_np's float64 intrinsics against the float32 formula: within RAYS_RTOL (derived there)
        torch.testing.assert_close(batch_rays, expected[:, index], rtol=0, atol=RAYS_RTOL * expected.abs().max())
        torch.testing.assert_close(target, torch.from_numpy(images).reshape(-1, 3)[index], rtol=0, atol=0)
    for step in range(1, 6):
        state = np.random.get_state()
        batch_rays, target = sampler(step)
        np.random.set_state(state)
        img_i = int(np.random.choice([0, 1, 2, 3]))
        rays = torch.stack(run_nerf_helpers.get_rays(H, W, K, torch.from_numpy(poses[img_i, :3, :4])), 0)
        pixels = [torch.nonzero((torch.from_numpy(images[img_i]) == t).all(-1))[0] for t in target]
        torch.testing.assert_close(batch_rays, torch.stack([rays[:, r, c] for r, c in pixels], 1), rtol=0, atol=0)
        np.random.set_state(state)
        sampler(step)
    assert batcher.device_bytes_per_pixel == (12 + 24 if edited else 12)   # float32 colours (+ the rays)


def count_hook(calls: dict):
    def hook(module, args, output=None):
        calls["n"] += 1
    return hook


HOOKS = {
    "forward hook": lambda net, calls: net.pts_linears[0].register_forward_hook(count_hook(calls)),
    "forward pre-hook": lambda net, calls: net.register_forward_pre_hook(count_hook(calls)),
    "hook-based weight_norm": lambda net, calls: nn.utils.weight_norm(net.pts_linears[1]),
}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("hook", HOOKS)
def test_a_network_with_hooks_takes_the_plain_path(hook, scene, tmp_path, monkeypatch, count_fast_queries, caplog):
    """Hooks run on every evaluation, which the fused one skips: a network
    with any trains exactly as --fast_path off, with its hooks called."""
    original, calls = NeRF.__init__, {"n": 0}

    def with_hook(self, *args, **kwargs):
        original(self, *args, **kwargs)
        HOOKS[hook](self, calls)

    monkeypatch.setattr(NeRF, "__init__", with_hook)
    with caplog.at_level(logging.INFO, logger="nerf"):
        auto = train(scene, tmp_path / "auto")
    assert count_fast_queries["n"] == 0 and fast_path_warnings(caplog) == []
    hooked = calls["n"]
    assert_same_weights(auto, train(scene, tmp_path / "off", "--fast_path", "off"))
    if hook != "hook-based weight_norm":
        assert calls["n"] == 2 * hooked > 0          # called in every evaluation of both runs alike


def test_a_hook_for_all_modules_rules_out_the_fast_path():
    embed, input_ch = get_embedder(2)
    net = NeRF(D=2, W=16, input_ch=input_ch, input_ch_views=0, output_ch=4)
    pts = torch.rand(4, 8, 3)
    assert fast_mlp.supports(net, embed, None, pts, None)
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fast_mlp.supports(net, embed, None, pts, None)
    finally:
        handle.remove()


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Trying to backward through the graph a second time")


def test_any_failure_in_the_probe_is_the_plain_path_with_one_warning(monkeypatch, caplog):
    embed, input_ch = get_embedder(2)
    net = NeRF(D=2, W=16, input_ch=input_ch, input_ch_views=0, output_ch=4)
    pts = torch.rand(4, 8, 3)
    query = fast_mlp.query
    monkeypatch.setattr(fast_mlp, "query", lambda *args, **kwargs: FailingBackward.apply(query(*args, **kwargs)))

    def plain(p, d):
        return rendering.plain_network(p, d, net, embed, None, 1024)

    with caplog.at_level(logging.INFO, logger="nerf"):
        assert not fast_mlp.matches_plain_path(net, embed, None, pts, None, 1024, plain)
        assert not fast_mlp.matches_plain_path(net, embed, None, pts, None, 1024, plain)
    assert fast_path_warnings(caplog) == [
        "warning: fast path: NeRF fails on a probe batch (RuntimeError: Trying to backward through the graph a "
        "second time); using the plain path for this network (--fast_path off skips the check)"]
