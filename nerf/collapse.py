"""The collapse guard: a network whose densities all fell to zero (a background render) is caught and started again.

NeRF's density is relu(raw sigma). When every sample a network sees has a
raw sigma <= 0, every alpha is 0, the render is the background, and the
network's density output receives a gradient of exactly zero,

    dL/dsigma_i = relu'(sigma_i) * dL/drelu(sigma_i) = 0   for every sample i,

so it never recovers (nerf-pytorch #5, nerf_pl #46, bmild/nerf #29). A
sample with positive density only where the ray ends (delta = 1e10, alpha
= 1 whatever sigma) gets no density gradient either: that network cannot
shape geometry, and counts as collapsed too.

The guard watches the density output layer of each network on its own (the
coarse one can die while the fine one, fed uniform samples, still learns),
two ways, neither of which depends on the logging flags:

- a probe before the first step: the colour loss of a fixed batch of
  training rays, rendered without noise, is backpropagated once; a network
  born dead (13 of the demo's 20 seeds have one, docs/robustness.md) is drawn
  again until the probe finds it alive. Every network drawn again mid-run is
  probed likewise. The probe moves no random generator, so a healthy run
  is the unguarded run bit for bit.
- a streak per network, on the device: after each step's backward (and the
  data-parallel gradient average, so that every rank sees the same numbers)
  a network whose density-layer gradient is exactly zero adds one to its
  streak, any other step resets it. Each step the streaks go to the host
  through a non-blocking copy and are read one step later, when the next
  step's work is queued: the host never waits for the step it has just
  queued. A streak of at least `patience` restarts that network at the step
  that reads it.

A restart draws the network's weights again from the next seed (seed +
number of restarts so far) and clears its Adam state; after `max_restarts`
restarts the run ends with one error line. Only a dead network starts again:
drawing both again would often trade a living network for a dead one. With
softplus densities (`--density_activation softplus`) the gradient is never
exactly zero and the guard never fires. What the guard decides depends on
the steps done only (never on --N_iters, the logging flags or a stop), so an
interrupted run, resumed, ends as the uninterrupted one.
"""
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from nerf import parallel

log = logging.getLogger("nerf")

CHECKPOINT_KEY = "collapse_guard"


def density_gradients(network: nn.Module) -> List[torch.Tensor]:
    """The gradients of the layer that outputs raw sigma: `alpha_linear`
    (weight (1, W), bias (1,)) with view directions, else row 3 of
    `output_linear` (weight (W,), bias ()). Empty when there is none yet,
    or for a network without these layers (a fork's own model: not watched)."""
    if getattr(network, "use_viewdirs", False) and hasattr(network, "alpha_linear"):
        params, row = [network.alpha_linear.weight, network.alpha_linear.bias], None
    elif hasattr(network, "output_linear") and network.output_linear.out_features > 3:
        params, row = [network.output_linear.weight, network.output_linear.bias], 3
    else:
        return []
    return [p.grad if row is None else p.grad[row] for p in params if p.grad is not None]


def zero_density_gradient(network: nn.Module, device: torch.device) -> torch.Tensor:
    """A bool 0-d tensor on `device`: whether the network has a density
    gradient and it is exactly zero (device operations only)."""
    grads = density_gradients(network)
    zero = torch.full((), bool(grads), dtype=torch.bool, device=device)   # a fill, not a copy
    for g in grads:
        zero = zero & g.eq(0).all()
    return zero


def reinitialise(network: nn.Module) -> None:
    """Draws every layer's parameters again, in the order the constructor
    creates them (nn.Linear's default initialisation), from torch's global generator."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


def probe_batch(pixels, n_rays: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`n_rays` training pixels for the probe: as even a share of each
    training image as n_rays allows (the first images get one more), each at
    a uniformly drawn pixel, drawn by a generator of their own seeded with
    `seed` (the run's generators do not move). `pixels`: the ray sampler's
    `nerf.ray_batches.TrainingPixels`. Returns (rays (2, n_rays, 3) [rays_o,
    rays_d], colours (n_rays, 3)), on the training device."""
    generator = torch.Generator().manual_seed(seed)
    per_image = pixels.H * pixels.W
    n_images = pixels.n_pixels // per_image
    rays, indices = [], []
    for k in range(min(n_images, n_rays)):
        count = n_rays // n_images + (k < n_rays % n_images)
        index = k * per_image + torch.randint(per_image, (count,), generator=generator)
        rays.append(pixels.rays_of(index, k))
        indices.append(index)
    return torch.cat(rays, 1), pixels.colours_at(torch.cat(indices))


class CollapseGuard:
    """Per-network streaks of steps whose density gradient was exactly zero,
    and the probe.

    networks: {"coarse": network_fn, "fine": network_fine} (fine absent
    without N_importance). probe: backpropagates the probe batch's loss into
    the networks' gradients (None: no probe); probe_rays: its size, for the
    messages. `start()` before a fresh run's first step; `observe()` after
    each step's gradients are final, then `watch(step)`; `state_dict()` /
    `load_state_dict()` for checkpoints; `notes()` for args.txt.
    """

    def __init__(self, networks: Dict[str, nn.Module], optimizer: torch.optim.Optimizer, seed: int,
                 device: torch.device, ranks: parallel.Ranks = parallel.Ranks(), patience: int = 20,
                 max_restarts: int = 10, enabled: bool = True, probe: Optional[Callable[[], None]] = None,
                 probe_rays: int = 0):
        self.networks, self.optimizer, self.seed = networks, optimizer, seed
        self.device, self.ranks = device, ranks
        self.patience, self.max_restarts, self.enabled = patience, max_restarts, enabled
        self.probe, self.probe_rays = probe, probe_rays
        self.streak = torch.zeros(len(networks), dtype=torch.long, device=device)
        # The streaks as the previous step left them, on the host (page-locked where copies can be asynchronous).
        self._sent = torch.zeros(len(networks), dtype=torch.long, pin_memory=device.type == "cuda")
        self._sent_view = self._sent.numpy()
        self._copied = None     # an event: the copy into _sent is done (none on the CPU, where copies are)
        self.restarts: List[dict] = []

    def start(self) -> Optional[str]:
        """Probes the networks before a fresh run's first step and draws the
        dead ones again until the probe finds them alive (a host
        synchronisation, once). Returns None, or the one error line when the
        restarts are used up."""
        if not self.enabled:
            return None
        return self._restart_until_alive(0, self.dead_on_probe(list(self.networks)), 0)

    def observe(self) -> None:
        """streak_n <- (streak_n + 1) if network n's density gradient is all
        zeros this step, else 0 (also when it has none). Device operations only: no host
        synchronisation."""
        if not self.enabled:
            return
        dead = [zero_density_gradient(network, self.device) for network in self.networks.values()]
        self.streak.add_(1).mul_(torch.stack(dead))

    def watch(self, step: int) -> Optional[str]:
        """After `observe()`, every step: reads the streaks of the step before
        (copied then; this waits for that step's work only, with this step's
        queued behind it), restarts each network whose streak had reached
        `patience`, then sends this step's streaks on. Returns None, or the one
        error line when the restarts are used up. Every rank decides alike: the
        streaks come from averaged gradients."""
        if not self.enabled:
            return None
        if self._copied is not None:
            self._copied.synchronize()
        streaks = self._sent_view.tolist()
        dead = [name for name, n in zip(self.networks, streaks) if n >= self.patience]
        failed = self._restart_until_alive(step, dead, max(streaks)) if dead else None
        self._sent.copy_(self.streak, non_blocking=True)
        if self.device.type != "cpu":
            self._copied = torch.Event(device=self.device)
            self._copied.record()
        return failed

    def dead_on_probe(self, names: List[str]) -> List[str]:
        """Of the networks `names`, those whose density gradient is exactly
        zero on the probe batch, on every rank (a host synchronisation). The
        gradients are cleared before and after; nothing else changes."""
        if self.probe is None or not names:
            return []
        self.optimizer.zero_grad(set_to_none=True)
        self.probe()
        dead = [name for name in names if bool(zero_density_gradient(self.networks[name], self.device))]
        self.optimizer.zero_grad(set_to_none=True)
        verdicts = parallel.all_gather(dead, self.ranks)
        return [name for name in names if all(name in v for v in verdicts)]

    def _restart_until_alive(self, step: int, dead: List[str], steps: int) -> Optional[str]:
        """Restarts the networks `dead` at `step` (dead for `steps` steps in a
        row; 0: on the probe batch), probes them, and restarts those still dead,
        until none is or the restarts are used up (then returns the error line)."""
        while dead:
            whose = "networks'" if len(dead) > 1 else "network's"
            where = f"for {steps} steps" if steps else f"on a probe batch of {self.probe_rays} rays"
            what = (f"the {' and '.join(dead)} {whose} density had a gradient of exactly zero {where} "
                    f"(no sample above zero density)")
            if len(self.restarts) >= self.max_restarts:
                return (f"collapse guard: step {step}: {what}, after {len(self.restarts)} restart(s) "
                        f"(seeds {', '.join(str(r['seed']) for r in self.restarts) or 'none'}); giving up "
                        f"(try another --seed, or --density_activation softplus)")
            seed = self.seed + len(self.restarts) + 1
            self.restart(seed, dead)
            self.restarts.append({"step": step, "networks": ",".join(dead), "steps": steps, "seed": seed})
            again = "both networks" if len(dead) > 1 else f"the {dead[0]} network"
            log.warning("collapse guard: step %d: %s; restarted %s (new weights, Adam state cleared) from seed %d "
                        "(restart %d of at most %d)", step, what, again, seed, len(self.restarts), self.max_restarts)
            dead, steps = self.dead_on_probe(dead), 0
        return None

    def restart(self, seed: int, names: List[str]) -> None:
        """The networks `names` drawn afresh (coarse before fine, layers in
        construction order) after torch.manual_seed(seed), their Adam state cleared and
        streaks set to 0; a network still learning keeps its weights and
        state. Ranks 1.. then draw their sampling noise from their own seeds
        again, as at the start of a run."""
        torch.manual_seed(seed)
        params = []
        for name in self.networks:
            if name in names:
                reinitialise(self.networks[name])
                params += list(self.networks[name].parameters())
        parallel.broadcast_parameters(params, self.device)
        for p in params:
            p.grad = None
            self.optimizer.state.pop(p, None)
        keep = torch.tensor([name not in names for name in self.networks], device=self.device)
        self.streak.mul_(keep)
        if self.ranks.rank > 0:
            torch.manual_seed(parallel.noise_seed(seed, self.ranks.rank))

    def notes(self) -> List[str]:
        """One line per restart, for args.txt (`restart_notes`)."""
        return restart_notes(self.restarts)

    def state_dict(self) -> dict:
        """{CHECKPOINT_KEY: {...}} to add to a checkpoint; {} when off."""
        if not self.enabled:
            return {}
        return {CHECKPOINT_KEY: {"streak": self.streak.cpu(), "restarts": [dict(r) for r in self.restarts]}}

    def load_state_dict(self, ckpt: Optional[dict]) -> None:
        """Resumes from a checkpoint's guard state (none in older files, or
        when the guard was off: streaks at 0, no restarts). The first step
        after it reads the saved streaks, as the uninterrupted run reads them."""
        state = (ckpt or {}).get(CHECKPOINT_KEY)
        if state is None:
            return
        self.restarts = [dict(r) for r in state["restarts"]]
        if tuple(state["streak"].shape) == tuple(self.streak.shape):
            self.streak.copy_(state["streak"])
            self._sent.copy_(state["streak"])
def restart_notes(restarts: List[dict]) -> List[str]:
    """One line per restart, for args.txt (as comments, so that the file
    still reads as a config file)."""
    return [f"collapse guard: step {r['step']}: {r['networks']} network(s) {restart_cause(r)}; "
            f"restarted {'them' if ',' in r['networks'] else 'it'} from seed {r['seed']}" for r in restarts]


def restart_cause(restart: dict) -> str:
    """Why a restart happened: a streak of `steps` steps, or (steps 0) the probe batch."""
    return f"collapsed for {restart['steps']} steps" if restart["steps"] else "dead on the probe batch"


def notes_from_checkpoint(ckpt: Optional[dict]) -> List[str]:
    """The restart lines of the run a checkpoint comes from (none for older files or an unguarded run)."""
    return restart_notes(((ckpt or {}).get(CHECKPOINT_KEY) or {}).get("restarts", []))


def guard_from_args(args, network_fn: nn.Module, network_fine: Optional[nn.Module], optimizer, device,
                    ranks: parallel.Ranks, ckpt: Optional[dict], pixels=None,
                    backward: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> CollapseGuard:
    """The run's guard (`--collapse_guard`, `--collapse_patience`,
    `--collapse_restarts`), resumed from `ckpt`. Its probe: `backward(rays,
    colours)` of a `probe_batch` of --N_rand of the training `pixels` (none
    without them)."""
    networks = {"coarse": network_fn, **({"fine": network_fine} if network_fine is not None else {})}
    on = args.collapse_guard == "on"
    probe = None
    if on and pixels is not None and backward is not None:
        rays, colours = probe_batch(pixels, args.N_rand, args.seed)
        probe = lambda: backward(rays, colours)  # noqa: E731
    guard = CollapseGuard(networks, optimizer, args.seed, device, ranks, args.collapse_patience,
                          args.collapse_restarts, on, probe, args.N_rand)
    guard.load_state_dict(ckpt)
    return guard
