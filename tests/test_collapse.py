"""The collapse guard (nerf/collapse.py) and --density_activation softplus.

The demo networks (configs/demo.txt: 4 x 64, view directions) at --seed 3
start with no positive density anywhere in the demo scene's box: the render
is the white background and no gradient ever flows. The guard must catch
that, per network, without touching a healthy run.
"""
import math
import os
import re
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_nerf
from nerf import collapse, flags, parallel
from nerf.rendering import compositing_weights, density, raw2outputs
from host_syncs import HostSyncCounter
from test_demo_run import demo_dir  # noqa: F401 (fixture)
from test_robustness import assert_same_weights, weights

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
QUIET = ["--i_img", "1000000", "--i_video", "1000000", "--i_testset", "1000000"]


def demo_run(demo_dir: Path, basedir: Path, *extra: str):  # noqa: F811
    """configs/demo.txt's networks on the small demo scene, 128 rays a step;
    the guard's streaks are read every 5 steps (i_print) and 5 in a row count."""
    return ["--config", str(REPO / "configs" / "demo.txt"), "--datadir", str(demo_dir), "--basedir", str(basedir),
            "--expname", "run", "--N_rand", "128", "--i_print", "5", "--collapse_patience", "5", *QUIET, *extra]


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def max_change(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("batching", [[], ["--no_batching"]], ids=["batching", "no_batching"])
def test_a_network_born_dead_is_drawn_again_before_the_first_step_and_the_run_trains(
        demo_dir, tmp_path, caplog, batching):  # noqa: F811
    argv = demo_run(demo_dir, tmp_path, "--seed", "3", "--N_iters", "4", "--i_weights", "2", *batching)
    assert run_nerf.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if "collapse guard" in r.getMessage()]
    assert lines == ["collapse guard: step 0: the coarse and fine networks' density had a gradient of exactly zero on "
                     "a probe batch of 128 rays (no sample above zero density); restarted both networks (new weights, "
                     "Adam state cleared) from seed 4 (restart 1 of at most 10)"]
    early, later = checkpoint(tmp_path / "run" / "000002.tar"), checkpoint(tmp_path / "run" / "000004.tar")
    assert early["collapse_guard"]["restarts"] == [{"step": 0, "networks": "coarse,fine", "steps": 0, "seed": 4}]
    # The redrawn networks learn from the first step: two more steps move the weights of both.
    for part in ("network_fn_state_dict", "network_fine_state_dict"):
        assert max_change(early[part], later[part]) > 1e-3, part
    assert later["collapse_guard"]["streak"].tolist() == [0, 0]
    notes = [line for line in (tmp_path / "run" / "args.txt").read_text().splitlines() if line.startswith("#")]
    assert notes == ["# collapse guard: step 0: coarse,fine network(s) dead on the probe batch; "
                     "restarted them from seed 4"]


def test_without_the_guard_the_dead_start_never_moves(demo_dir, tmp_path):  # noqa: F811
    """The failure the guard exists for: --collapse_guard off, seed 3, the weights stay the initial ones."""
    argv = demo_run(demo_dir, tmp_path, "--seed", "3", "--collapse_guard", "off", "--i_weights", "1")
    assert run_nerf.main([*argv, "--N_iters", "1"]) == 0
    assert run_nerf.main([*argv, "--N_iters", "8"]) == 0
    first, last = checkpoint(tmp_path / "run" / "000001.tar"), checkpoint(tmp_path / "run" / "000008.tar")
    assert "collapse_guard" not in last
    for part in ("network_fn_state_dict", "network_fine_state_dict"):
        assert max_change(first[part], last[part]) == 0, part


def test_a_coarse_network_dying_alone_is_caught(demo_dir, tmp_path, capsys):  # noqa: F811
    """Seed 0 trains; its coarse network's density bias pushed to -1000 after step 2 kills it alone
    (the fine one goes on learning): the guard names the coarse network. Its streak was 2 already (seed 0's
    coarse network got no density gradient at steps 1 and 2 either), reaches the patience of 3 at step 3 and is
    read at step 4, where neither i_print 5 nor i_weights 14 reads anything."""
    argv = demo_run(demo_dir, tmp_path, "--seed", "0", "--i_weights", "2", "--collapse_patience", "3",
                    "--collapse_restarts", "0")
    assert run_nerf.main([*argv, "--N_iters", "2"]) == 0
    path = tmp_path / "run" / "000002.tar"
    ckpt = checkpoint(path)
    assert ckpt["collapse_guard"]["streak"].tolist() == [2, 0]
    ckpt["network_fn_state_dict"]["alpha_linear.bias"] = torch.full((1,), -1000.0)
    torch.save(ckpt, path)
    assert run_nerf.main([*argv, "--N_iters", "14", "--i_weights", "14"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: collapse guard: step 4: the coarse network's density had a "
                                               "gradient of exactly zero for 3 steps"), err
    assert sorted(p.name for p in (tmp_path / "run").glob("*.tar")) == ["000002.tar"]


def test_a_healthy_run_is_bit_identical_with_and_without_the_guard(demo_dir, tmp_path):  # noqa: F811
    """Seed 4: both networks get a density gradient at every step, so even the strictest guard (patience 1,
    read every step) leaves it alone: checkpoints, generators and ray order equal to the unguarded run's."""
    for guard in ("on", "off"):
        argv = demo_run(demo_dir, tmp_path, "--seed", "4", "--expname", guard, "--collapse_guard", guard,
                        "--i_print", "1", "--collapse_patience", "1", "--N_iters", "12", "--i_weights", "6")
        assert run_nerf.main(argv) == 0
    for step in (6, 12):
        on, off = (checkpoint(tmp_path / name / f"{step:06d}.tar") for name in ("on", "off"))
        assert on.pop("collapse_guard")["restarts"] == [] and "collapse_guard" not in off
        assert_same_weights(weights(tmp_path / "on" / f"{step:06d}.tar"), weights(tmp_path / "off" / f"{step:06d}.tar"))
        assert torch.equal(on["rng_state"]["torch"], off["rng_state"]["torch"])
        assert torch.equal(on["sampler_state"]["perm"], off["sampler_state"]["perm"])


def stop_by_sigterm_at(monkeypatch, step: int, start: int) -> None:
    """The run resumed at `start` gets a SIGTERM during step `step`'s training step."""
    calls = []

    def train_step(*args, **kwargs):
        calls.append(1)
        if start + len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return plain_train_step(*args, **kwargs)

    plain_train_step = run_nerf.train_step
    monkeypatch.setattr(run_nerf, "train_step", train_step)


def test_a_run_stopped_at_any_step_and_resumed_ends_as_the_uninterrupted_one(
        demo_dir, tmp_path, monkeypatch):  # noqa: F811
    """Seed 12: the fine network is alive at step 1 and dead from step 2 on (the probe passes it), so its streak
    reaches the patience of 3 at step 4 and is read at step 5, which restarts it (and draws it once more: the
    probe finds the first redraw dead). A chain of runs stops at every step from 1 to 6: at steps 1, 3, 5 as the
    end of its --N_iters, at 2, 4, 6 by a SIGTERM; it must write the uninterrupted run's checkpoint at every step
    (4: collapsed but not yet read; 5: the restart; 6: after it)."""
    n = 7
    common = demo_run(demo_dir, tmp_path, "--seed", "12", "--collapse_patience", "3", "--i_weights", "1")
    assert run_nerf.main([*common, "--expname", "straight", "--N_iters", str(n)]) == 0
    for stop in range(1, n + 1):
        with monkeypatch.context() as patch:
            if stop % 2 == 0 and stop < n:
                stop_by_sigterm_at(patch, stop, stop - 1)
                assert run_nerf.main([*common, "--expname", "chain", "--N_iters", str(n)]) == 128 + signal.SIGTERM
            else:
                assert run_nerf.main([*common, "--expname", "chain", "--N_iters", str(stop)]) == 0
        straight, chain = (tmp_path / name / f"{stop:06d}.tar" for name in ("straight", "chain"))
        assert_same_weights(weights(straight), weights(chain))
        a, b = checkpoint(straight), checkpoint(chain)
        assert a["collapse_guard"]["restarts"] == b["collapse_guard"]["restarts"], stop
        assert torch.equal(a["collapse_guard"]["streak"], b["collapse_guard"]["streak"]), stop
        assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"]), stop
    restarts = checkpoint(tmp_path / "straight" / f"{n:06d}.tar")["collapse_guard"]["restarts"]
    assert [(r["step"], r["networks"], r["steps"]) for r in restarts] == [(5, "fine", 3), (5, "fine", 0)]
    assert checkpoint(tmp_path / "straight" / "000004.tar")["collapse_guard"]["streak"].tolist() == [0, 3]
    notes = (tmp_path / "chain" / "args.txt").read_text()
    assert "# collapse guard: step 5: fine network(s) collapsed for 3 steps" in notes


def test_no_restarts_left_is_one_error_line_and_status_1(demo_dir, tmp_path, capsys):  # noqa: F811
    argv = demo_run(demo_dir, tmp_path, "--seed", "3", "--collapse_restarts", "0", "--N_iters", "20",
                    "--i_weights", "20")
    assert run_nerf.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: collapse guard: step 0: the coarse and fine networks' density had a gradient of exactly "
                   "zero on a probe batch of 128 rays (no sample above zero density), after 0 restart(s) (seeds "
                   "none); giving up (try another --seed, or --density_activation softplus)"]
    assert list((tmp_path / "run").glob("*.tar")) == []


class DemoNetworks:
    """configs/demo.txt's networks on the demo scene, built as a run builds them, and a check of which get no
    density gradient from the colour loss of training rays: the sampler's first 4 batches (512 rays), jittered
    as training jitters them (other rays than the probe's, rendered otherwise)."""

    def __init__(self, demo_dir: Path, basedir: Path):  # noqa: F811
        self.args = flags.parse_args(run_nerf.config_parser(), demo_run(demo_dir, basedir))
        self.scene = run_nerf.load_scene(self.args)
        numpy_state = np.random.get_state()
        with torch.random.fork_rng():          # the rays of a run at --seed 0, whatever ran before this test
            np.random.seed(0)                  # (the sampler shuffles the rays as it is made)
            torch.manual_seed(0)
            self.sampler = run_nerf.make_sampler(self.args, self.scene, CPU)
            batches = [self.sampler(i) for i in range(1, 5)]
        np.random.set_state(numpy_state)
        self.rays, self.target = torch.cat([b[0] for b in batches], 1), torch.cat([b[1] for b in batches], 0)

    def build(self, seed: int, ckpt_path: Optional[Path] = None):
        """(render_kwargs, optimizer, guard) of a run at --seed `seed`, or of its checkpoint."""
        self.args.seed = seed
        torch.manual_seed(seed)
        ckpt = None if ckpt_path is None else checkpoint(ckpt_path)
        kwargs, _, _, _, optimizer = run_nerf.create_nerf(self.args, CPU, ckpt, ckpt_path)
        kwargs.update(near=self.scene.near, far=self.scene.far)
        guard = collapse.guard_from_args(
            self.args, kwargs["network_fn"], kwargs["network_fine"], optimizer, CPU, parallel.Ranks(), ckpt,
            self.sampler.pixels, lambda rays, target: run_nerf.probe_backward(rays, target, self.scene, kwargs, 1024))
        return kwargs, optimizer, guard

    def dead(self, kwargs: dict, optimizer, on_probe_batch: bool = False) -> set:
        """The networks without a density gradient from the training rays (jittered as in training), or, with
        `on_probe_batch`, from the guard's own probe batch of this seed rendered without jitter or noise."""
        rays, target = self.rays, self.target
        if on_probe_batch:
            rays, target = collapse.probe_batch(self.sampler.pixels, self.args.N_rand, self.args.seed)
            kwargs = {**kwargs, "perturb": 0.0, "raw_noise_std": 0.0}
        optimizer.zero_grad()
        with torch.random.fork_rng():
            rgb, _, _, extras = run_nerf.render(self.scene.H, self.scene.W, self.scene.K, rays=rays, **kwargs)
        (F.mse_loss(rgb, target) + F.mse_loss(extras["rgb0"], target)).backward()
        found = {name for name, net in (("coarse", kwargs["network_fn"]), ("fine", kwargs["network_fine"]))
                 if all(g.eq(0).all() for g in collapse.density_gradients(net))}
        optimizer.zero_grad()
        return found


@pytest.fixture(scope="module")
def demo_networks(demo_dir, tmp_path_factory):  # noqa: F811
    return DemoNetworks(demo_dir, tmp_path_factory.mktemp("networks"))


def test_the_probe_finds_every_network_born_dead_and_leaves_none(demo_networks):
    """Seeds 0-19 (docs/robustness.md: 13 of them start with a dead network): the probe redraws exactly the
    networks that get no density gradient from its batch (128 rays, no jitter; recomputed here through `render`),
    and after `start()` no network is dead on that batch nor on 512 jittered training rays, but for the one
    network measured to be alive on some rays and dead on others (seed 0's coarse network: no density gradient
    from these training rays, nor at steps 1 and 2 of a run, see the coarse-alone test), which the per-step
    watch is there for. The probe changes nothing else: a network it passes keeps its weights, and a seed it
    passes whole keeps torch's generator state, bit for bit."""
    found, missed = {}, set()
    for seed in range(20):
        kwargs, optimizer, guard = demo_networks.build(seed)
        dead = demo_networks.dead(kwargs, optimizer, on_probe_batch=True)
        missed |= {(seed, name) for name in demo_networks.dead(kwargs, optimizer) - dead}
        nets = {"coarse": kwargs["network_fn"], "fine": kwargs["network_fine"]}
        before = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
        generator = torch.get_rng_state()
        assert guard.start() is None
        first = guard.restarts[0]["networks"].split(",") if guard.restarts else []
        assert set(first) == dead, seed
        assert demo_networks.dead(kwargs, optimizer, on_probe_batch=True) == set(), seed
        missed |= {(seed, name) for name in demo_networks.dead(kwargs, optimizer)}
        assert all(r["step"] == 0 for r in guard.restarts)
        redrawn = {name for r in guard.restarts for name in r["networks"].split(",")}
        for name in set(nets) - redrawn:
            assert all(torch.equal(v, nets[name].state_dict()[k]) for k, v in before[name].items()), (seed, name)
        assert redrawn or torch.equal(generator, torch.get_rng_state()), seed
        assert all(p.grad is None for net in nets.values() for p in net.parameters()), seed
        found[seed] = ",".join(sorted(dead))
    # The sweep holds every case: both networks dead, either alone, neither.
    assert {"", "coarse", "fine", "coarse,fine"} <= set(found.values()), found
    assert missed <= {(0, "coarse")}, missed


def test_detection_does_not_depend_on_the_logging_flags(demo_networks, demo_dir, tmp_path):  # noqa: F811
    """--i_print 1, 100, 1000 and 7 (more than --N_iters 6), with nothing else read before the last step
    (--i_weights beyond the run too): seed 3 (both networks born dead: the probe) and seed 12 (the fine network
    dead from step 2: its streak, read one step late every step) restart alike, end with the same weights bit for
    bit, and with networks that get a density gradient from training rays."""
    for seed, expected in ((3, [(0, "coarse,fine", 0)]), (12, [(5, "fine", 3), (5, "fine", 0)])):
        runs = []
        for i_print in (1, 100, 1000, 7):
            name = f"s{seed}_p{i_print}"
            argv = demo_run(demo_dir, tmp_path, "--seed", str(seed), "--expname", name, "--collapse_patience", "3",
                            "--N_iters", "6", "--i_print", str(i_print), "--i_weights", "1000000")
            assert run_nerf.main(argv) == 0
            runs.append(tmp_path / name / "000006.tar")
            restarts = checkpoint(runs[-1])["collapse_guard"]["restarts"]
            assert [(r["step"], r["networks"], r["steps"]) for r in restarts] == expected, (seed, i_print)
        for other in runs[1:]:
            assert_same_weights(weights(runs[0]), weights(other))
        kwargs, optimizer, _ = demo_networks.build(seed, runs[0])
        assert demo_networks.dead(kwargs, optimizer) == set(), seed


@pytest.mark.parametrize("flag, value, what", [("--collapse_guard", "maybe", "invalid choice"),
                                               ("--collapse_patience", "0", "must be at least 1"),
                                               ("--collapse_restarts", "-1", "must be 0 or more"),
                                               ("--density_activation", "elu", "invalid choice")])
def test_bad_guard_flags_are_one_line(demo_dir, tmp_path, capsys, flag, value, what):  # noqa: F811
    assert run_nerf.main(demo_run(demo_dir, tmp_path, flag, value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}: ") and what in err[0], err


# --- No host synchronisation per step -------------------------------------------

def test_watching_each_step_makes_the_host_wait_for_nothing_and_acts_one_step_late():
    """observe() and watch() every step, under host_syncs.HostSyncCounter: no call that would make the host wait
    for the device. The fine network is dead (density bias -1000): its streak reaches the patience of 2 at step 2,
    and watch() reads it at step 3, which restarts it; the living coarse network keeps its weights."""
    from run_nerf_helpers import NeRF
    torch.manual_seed(3)
    nets = {"coarse": NeRF(D=2, W=16, input_ch=6, input_ch_views=3, use_viewdirs=True),
            "fine": NeRF(D=2, W=16, input_ch=6, input_ch_views=3, use_viewdirs=True)}
    with torch.no_grad():
        nets["fine"].alpha_linear.bias.fill_(-1000.0)
    optimizer = torch.optim.Adam([p for n in nets.values() for p in n.parameters()])
    guard = collapse.CollapseGuard(nets, optimizer, 3, CPU, patience=2)
    coarse = {k: v.clone() for k, v in nets["coarse"].state_dict().items()}
    x = torch.randn(64, 9)
    for step in (1, 2, 3):
        optimizer.zero_grad()
        sum(net(x)[:, 3].relu().sum() for net in nets.values()).backward()
        with HostSyncCounter() as syncs:
            guard.observe()
            assert guard.watch(step) is None
        assert syncs.calls == [] or step == 3, syncs.calls
        assert guard.restarts == ([] if step < 3 else [{"step": 3, "networks": "fine", "steps": 2, "seed": 4}])
    assert guard.streak.tolist() == [0, 0]
    assert float(nets["fine"].alpha_linear.bias.detach().abs().max()) < 1
    assert all(torch.equal(v, nets["coarse"].state_dict()[k]) for k, v in coarse.items())


def test_zero_density_gradient_is_what_counts():
    """A network with relu(sigma) = 0 at every point gets a zero density gradient, one positive point makes it alive."""
    from run_nerf_helpers import NeRF
    torch.manual_seed(0)
    for use_viewdirs in (True, False):
        net = NeRF(D=2, W=16, input_ch=6, input_ch_views=3, use_viewdirs=use_viewdirs)
        guard = collapse.CollapseGuard({"coarse": net}, torch.optim.Adam(net.parameters()), 0, torch.device("cpu"))
        x = torch.randn(256, 9)
        layer = net.alpha_linear if use_viewdirs else net.output_linear
        for shift, dead in ((-1000.0, 1), (None, 0)):
            with torch.no_grad():
                sigma = net(x)[:, 3]
                layer.bias[-1 if use_viewdirs else 3] += (shift if shift is not None else 1e-3 - float(sigma.max()))
            net.zero_grad()
            (net(x)[:, 3].relu() * torch.rand(256)).sum().backward()
            guard.observe()
            assert guard.streak.tolist() == [dead], (use_viewdirs, shift)


# --- Softplus density ------------------------------------------------------------

def test_softplus_density_is_the_shifted_softplus():
    sigma = torch.tensor([-30.0, -2.0, 0.0, 1.0, 3.0])
    by_hand = [math.log1p(math.exp(s - 1)) for s in sigma.tolist()]   # 9.4e-14, 0.0486, 0.3133, 0.6931, 2.1269
    assert density(sigma, "softplus").tolist() == pytest.approx(by_hand, rel=1e-6)
    assert density(sigma, "softplus")[3].item() == pytest.approx(math.log(2.0), rel=1e-7)
    assert torch.equal(density(sigma), F.relu(sigma))


def test_raw2outputs_with_softplus_composites_the_softplus_densities():
    """Two rays of three samples, recomputed in float64 from the formulas."""
    raw = torch.tensor([[[0.0, 0.0, 0.0, -2.0], [1.0, 0.0, 0.0, 0.5], [0.0, 2.0, 0.0, 3.0]],
                        [[0.0, 0.0, 1.0, -5.0], [0.0, 0.0, 0.0, -5.0], [3.0, 0.0, 0.0, -5.0]]])
    z_vals = torch.tensor([[2.0, 2.5, 3.5], [2.0, 3.0, 4.0]])
    rays_d = torch.tensor([[0.0, 0.0, 2.0], [0.6, 0.8, 0.0]])
    rgb, disp, acc, w, depth = raw2outputs(raw, z_vals, rays_d, white_bkgd=True, density_activation="softplus")
    for n in range(2):
        deltas = [(z_vals[n, i + 1] - z_vals[n, i]).item() * rays_d[n].norm().item() for i in range(2)] + [1e10]
        T, weights_ = 1.0, []
        for i in range(3):
            alpha = 1 - math.exp(-math.log1p(math.exp(raw[n, i, 3].item() - 1)) * deltas[i])
            weights_.append(alpha * T)
            T *= 1 - alpha + 1e-10
        assert w[n].tolist() == pytest.approx(weights_, rel=1e-5, abs=1e-7)
        colour = [sum(weights_[i] / (1 + math.exp(-raw[n, i, c].item())) for i in range(3)) + 1 - sum(weights_)
                  for c in range(3)]
        assert rgb[n].tolist() == pytest.approx(colour, rel=1e-5)
        assert acc[n].item() == pytest.approx(sum(weights_), rel=1e-6)
    # relu would have given the second ray no density at all; softplus gives every sample some.
    assert raw2outputs(raw, z_vals, rays_d)[2][1].item() == 0 and acc[1].item() > 0
    assert compositing_weights(raw[..., 3], z_vals, rays_d, density_activation="softplus").equal(w)


def test_softplus_runs_train_without_a_dead_start(demo_dir, tmp_path, caplog):  # noqa: F811
    """Seed 3 with softplus densities: the weights move from step 1, and the guard never fires."""
    argv = demo_run(demo_dir, tmp_path, "--seed", "3", "--density_activation", "softplus", "--i_weights", "1")
    assert run_nerf.main([*argv, "--N_iters", "1"]) == 0
    assert run_nerf.main([*argv, "--N_iters", "6"]) == 0
    first, last = checkpoint(tmp_path / "run" / "000001.tar"), checkpoint(tmp_path / "run" / "000006.tar")
    assert max_change(first["network_fn_state_dict"], last["network_fn_state_dict"]) > 1e-4
    assert not any("collapse guard" in r.getMessage() for r in caplog.records)
    assert re.search(r"^density_activation = softplus$", (tmp_path / "run" / "args.txt").read_text(), re.M)


@pytest.mark.slow
def test_two_processes_restart_together_and_take_the_steps_of_one(demo_dir, tmp_path):  # noqa: F811
    """Seed 3 under torchrun (gloo, 2 processes, no sampling noise): both ranks probe alike (the verdicts are
    gathered), redraw both networks before step 1 from the same seed, and end with one process's weights."""
    from test_distributed import assert_close_weights, torchrun
    argv = demo_run(demo_dir, tmp_path, "--seed", "3", "--perturb", "0", "--N_iters", "16", "--i_weights", "16")
    assert run_nerf.main([*argv, "--expname", "one"]) == 0
    two = torchrun([*argv, "--expname", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("collapse guard: step 0:") == 1          # rank 0 says it, for both
    one, two = (tmp_path / name / "000016.tar" for name in ("one", "two"))
    assert checkpoint(one)["collapse_guard"]["restarts"] == checkpoint(two)["collapse_guard"]["restarts"] != []
    # Measured: 4e-7 (coarse), 1.3e-4 (fine: Adam's first steps turn rounding-size gradients of another
    # summation order into steps up to lrate = 2e-3). Ranks that disagreed would differ by the init's scale, 0.1.
    assert_close_weights(one, two, atol=5e-4)


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_meshes_take_the_runs_density_activation(activation):
    """extract_mesh's densities are the ones the run rendered with: relu(s) or log(1 + exp(s - 1))."""
    import extract_mesh

    raw_sigma = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)

    def query(pts, viewdirs, network, density_only=False):      # raw sigma = the point's x coordinate
        return pts[..., :1]

    kwargs = {"network_fn": None, "network_fine": None, "network_query_fn": query, "use_viewdirs": False}
    if activation != "relu":
        kwargs["density_activation"] = activation
    pts = torch.stack([raw_sigma, torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)], -1)
    got = extract_mesh.query_density(pts, kwargs, netchunk=3)
    expected = [max(s, 0.0) if activation == "relu" else math.log1p(math.exp(s - 1.0)) for s in raw_sigma.tolist()]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_checkpoint_refuses_another_density_activation(demo_dir, tmp_path, capsys):  # noqa: F811
    """A softplus run rendered or resumed without --density_activation softplus
    (say with the shipped config) is one line naming the flag, not a silent relu."""
    argv = demo_run(demo_dir, tmp_path, "--density_activation", "softplus", "--N_iters", "2", "--i_weights", "2")
    assert run_nerf.main(argv) == 0
    assert checkpoint(tmp_path / "run" / "000002.tar")["density_activation"] == "softplus"
    capsys.readouterr()
    plain = demo_run(demo_dir, tmp_path, "--N_iters", "4")
    for extra in ([], ["--render_only"]):
        assert run_nerf.main([*plain, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was trained with --density_activation softplus" in err[0], err
    assert sorted(p.name for p in (tmp_path / "run").glob("*.tar")) == ["000002.tar"]
