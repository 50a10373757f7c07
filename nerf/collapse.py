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
coarse one can die while the fine one, fed uniform samples, still learns):
after each step's backward (and the data-parallel gradient average, so that
every rank sees the same numbers), a network whose density-layer gradient is
exactly zero adds one to its streak, any other step resets it. All of it
stays on the device; the streaks are read only on the steps where the loop
reads its numbers anyway (i_print, i_weights, ... steps). A streak of at
least `patience` steps restarts that network (new weights, its Adam state
cleared) from the next seed (seed + number of restarts so far); after
`max_restarts` restarts the run ends with one error line. Only the collapsed
network starts again: 15 of the demo's 40 initial networks (seeds 0-19)
are born dead (docs/robustness.md), so drawing both again would often
trade a living network for a dead one. With softplus densities (`--density_activation
softplus`) the gradient is never exactly zero and the guard never fires.

A healthy run is untouched: the guard reads gradients and never writes
parameters, gradients or random generators until it restarts.
"""
import logging
from typing import Dict, List, Optional

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


def reinitialise(network: nn.Module) -> None:
    """Draws every layer's parameters again, in the order the constructor
    creates them (nn.Linear's default initialisation), from torch's global generator."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


class CollapseGuard:
    """Per-network streaks of steps whose density gradient was exactly zero.

    networks: {"coarse": network_fn, "fine": network_fine} (fine absent
    without N_importance). `observe()` after each step's gradients are final;
    `check(step)` when the step's numbers are read; `state_dict()` /
    `load_state_dict()` for checkpoints; `notes()` for args.txt.
    """

    def __init__(self, networks: Dict[str, nn.Module], optimizer: torch.optim.Optimizer, seed: int,
                 device: torch.device, ranks: parallel.Ranks = parallel.Ranks(), patience: int = 20,
                 max_restarts: int = 10, enabled: bool = True):
        self.networks, self.optimizer, self.seed = networks, optimizer, seed
        self.device, self.ranks = device, ranks
        self.patience, self.max_restarts, self.enabled = patience, max_restarts, enabled
        self.streak = torch.zeros(len(networks), dtype=torch.long, device=device)
        self.restarts: List[dict] = []

    def observe(self) -> None:
        """streak_n <- (streak_n + 1) if network n's density gradient is all
        zeros this step, else 0 (also when it has none). Device operations only: no host
        synchronisation."""
        if not self.enabled:
            return
        dead = []
        for network in self.networks.values():
            grads = density_gradients(network)
            zero = torch.full((), bool(grads), dtype=torch.bool, device=self.device)   # a fill, not a copy
            for g in grads:
                zero = zero & g.eq(0).all()
            dead.append(zero)
        self.streak.add_(1).mul_(torch.stack(dead))

    def check(self, step: int, last: bool) -> Optional[str]:
        """Reads the streaks (a host synchronisation: call it only where the
        loop reads numbers anyway). Restarts when a network's streak has
        reached `patience` and steps are left; returns None, or the one
        error line when the restarts are used up. Every rank decides alike:
        the streaks come from averaged gradients."""
        if not self.enabled:
            return None
        streaks = self.streak.tolist()
        dead = [name for name, n in zip(self.networks, streaks) if n >= self.patience]
        if not dead:
            return None
        whose = "networks'" if len(dead) > 1 else "network's"
        what = (f"the {' and '.join(dead)} {whose} density had a gradient of "
                f"exactly zero (no sample above zero density) for {max(streaks)} steps")
        if len(self.restarts) >= self.max_restarts:
            return (f"collapse guard: step {step}: {what}, after {len(self.restarts)} restart(s) "
                    f"(seeds {', '.join(str(r['seed']) for r in self.restarts) or 'none'}); giving up "
                    f"(try another --seed, or --density_activation softplus)")
        if last:
            log.warning("warning: collapse guard: step %d: %s; no steps are left to start again", step, what)
            return None
        seed = self.seed + len(self.restarts) + 1
        self.restart(seed, dead)
        self.restarts.append({"step": step, "networks": ",".join(dead), "steps": max(streaks), "seed": seed})
        again = "both networks" if len(dead) > 1 else f"the {dead[0]} network"
        log.warning("collapse guard: step %d: %s; restarted %s (new weights, Adam state cleared) from seed %d "
                    "(restart %d of at most %d)", step, what, again, seed, len(self.restarts), self.max_restarts)
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
        when the guard was off: streaks at 0, no restarts)."""
        state = (ckpt or {}).get(CHECKPOINT_KEY)
        if state is None:
            return
        self.restarts = [dict(r) for r in state["restarts"]]
        if tuple(state["streak"].shape) == tuple(self.streak.shape):
            self.streak.copy_(state["streak"])


def restart_notes(restarts: List[dict]) -> List[str]:
    """One line per restart, for args.txt (as comments, so that the file
    still reads as a config file)."""
    return [f"collapse guard: step {r['step']}: {r['networks']} network(s) collapsed for {r['steps']} steps; "
            f"restarted {'them' if ',' in r['networks'] else 'it'} from seed {r['seed']}" for r in restarts]


def notes_from_checkpoint(ckpt: Optional[dict]) -> List[str]:
    """The restart lines of the run a checkpoint comes from (none for older files or an unguarded run)."""
    return restart_notes(((ckpt or {}).get(CHECKPOINT_KEY) or {}).get("restarts", []))


def guard_from_args(args, network_fn: nn.Module, network_fine: Optional[nn.Module], optimizer, device,
                    ranks: parallel.Ranks, ckpt: Optional[dict]) -> CollapseGuard:
    """The run's guard (`--collapse_guard`, `--collapse_patience`,
    `--collapse_restarts`), resumed from `ckpt`."""
    networks = {"coarse": network_fn, **({"fine": network_fine} if network_fine is not None else {})}
    guard = CollapseGuard(networks, optimizer, args.seed, device, ranks, args.collapse_patience,
                          args.collapse_restarts, args.collapse_guard == "on")
    guard.load_state_dict(ckpt)
    return guard
