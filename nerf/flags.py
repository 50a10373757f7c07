"""The command line and config files: flags checked before any heavy work, so a typo costs seconds, not a run.

Every problem found is a `DataError(where, what)`, which the command line
prints as one line, `error: <file or flag>: <what is wrong>`, exiting with
status 2. `parse_args` checks the command line and the config file (exists,
every line is `key = value` with a known key and a value of the right type),
then the numeric flags' ranges and `dataset_type`; `choose_device` checks
`--device` and `check_world_size` the split of `--N_rand` over processes.
The data folder is checked by :mod:`nerf.data_checks`, the run folder by
:mod:`nerf.run_folder`.
"""
import argparse
import difflib
import io
import logging
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import configargparse
import torch

from nerf.datasets import DATASET_TYPES
from nerf.errors import DataError
from nerf.occupancy import parse_box
from run_nerf_helpers import default_device

log = logging.getLogger("nerf")

log = logging.getLogger("nerf")

BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def parse_bool(value: str) -> bool:
    """A switch's value, `True`/`False` (or yes/no, on/off, 1/0, any case)."""
    word = str(value).lower()
    if word not in BOOLEAN_WORDS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(BOOLEAN_WORDS)}, got '{value}'")
    return BOOLEAN_WORDS.index(word) % 2 == 0


class Switch(argparse.Action):
    """An off-by-default flag that also takes a value: `--half_res` and
    `--half_res True` turn it on, `--half_res False` turns off what a config
    file turned on. Registered as `store_true` by `run_nerf.config_parser`."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, type=parse_bool,
                         required=required, help=help, metavar="True|False")

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


# (flag, test, what the value must be); checked in this order.
_AT_LEAST_1 = ("N_rand", "N_samples", "chunk", "netchunk", "factor", "netdepth", "netwidth", "netdepth_fine",
               "netwidth_fine", "lrate_decay", "i_print", "i_img", "i_weights", "i_testset", "i_video",
               "collapse_patience", "occupancy_steps", "occupancy_interval", "occupancy_cells")
_AT_LEAST_0 = ("N_importance", "N_iters", "llffhold", "precrop_iters", "testskip", "render_factor", "multires",
               "multires_views", "keep_checkpoints", "collapse_restarts", "occupancy_warmup")
_FLOATS_AT_LEAST_0 = ("lrate", "perturb", "raw_noise_std")


# --- Command line and config file -------------------------------------------

def parse_args(parser: configargparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """`parser.parse_args(argv)` where every mistake is a DataError instead of
    argparse's usage text: an unknown flag, a bad value, a missing or
    malformed config file, an unknown config key; then the flags' ranges."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.error = _raise_parse_error(parser)   # this instance only
    sources: Dict[str, str] = {}
    for path in _config_paths(parser, argv):
        sources.update(check_config_file(parser, path))
    args = parser.parse_args(argv)
    given = {_long_name(tok) for tok in argv if tok.startswith("--")}
    check_flags(args, {k: v for k, v in sources.items() if k not in given})
    return args


def _long_name(token: str) -> str:
    return token.split("=", 1)[0][2:]


def _option_names(parser) -> List[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _raise_parse_error(parser):
    def error(message: str):
        match = re.match(r"argument (\S+): (.*)", message, re.S)
        if match:
            raise DataError(match.group(1).split("/")[-1], match.group(2))
        match = re.match(r"unrecognized arguments: (.*)", message, re.S)
        if match:
            first = match.group(1).split()[0]
            if first.startswith("-"):
                flag = first.split("=", 1)[0]
                raise DataError(flag, "unknown flag" + _did_you_mean(flag, _option_names(parser)))
            raise DataError("command line", f"unexpected value '{first}' (a flag that takes no value?)")
        raise DataError("command line", message)
    return error


def _config_paths(parser, argv: List[str]) -> List[str]:
    """The config files named on the command line (`--config F` or `--config=F`)."""
    opts = [s for a in parser._actions if getattr(a, "is_config_file_arg", False) for s in a.option_strings]
    paths = []
    for k, tok in enumerate(argv):
        for opt in opts:
            if tok == opt and k + 1 < len(argv):
                paths.append(argv[k + 1])
            elif tok.startswith(opt + "="):
                paths.append(tok[len(opt) + 1:])
    return paths


def check_config_file(parser, path: str) -> Dict[str, str]:
    """Checks a `key = value` config file line by line, with the parser's own
    grammar: each key must be a flag's name and each value fit its type.
    Returns {flag name: "<file> line <n>"} for the keys it sets."""
    if not Path(path).is_file():
        raise DataError(path, "config file does not exist" if not Path(path).exists() else "config file is not a file")
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable config file ({exc.__class__.__name__})") from None
    known = {key: action for action in parser._actions for key in parser.get_possible_config_keys(action)}
    names = sorted({k for k in known if not k.startswith("-")})
    sources = {}
    for lineno, line in enumerate(lines, 1):
        try:
            items = parser._config_file_parser.parse(io.StringIO(line))
        except Exception:
            raise DataError(path, f"line {lineno}: cannot parse '{line.strip()}' (expected key = value)") from None
        for key, value in items.items():
            action = known.get(key)
            if action is None:
                raise DataError(path, f"line {lineno}: unknown key '{key}'{_did_you_mean(key, names)}")
            problem = _value_problem(action, value)
            if problem:
                raise DataError(path, f"line {lineno}: {key} = {value}: {problem}")
            sources[action.dest] = f"{path} line {lineno}"
    return sources


def _value_problem(action, value) -> Optional[str]:
    """Why configargparse would reject `value` for `action`, or None."""
    if isinstance(value, list):
        return None if action.nargs not in (None, "?") else "expected a single value, not a list"
    if isinstance(action, (Switch, *configargparse.ACTION_TYPES_THAT_DONT_NEED_A_VALUE)):
        return None if value.lower() in BOOLEAN_WORDS else f"expected one of {', '.join(BOOLEAN_WORDS)}"
    if action.type in (int, float):
        try:
            action.type(value)
        except ValueError:
            return "not an integer" if action.type is int else "not a number"
    if action.choices and value not in [str(c) for c in action.choices]:
        return f"expected one of {', '.join(map(str, action.choices))}"
    return None


def check_flags(args, sources: Optional[Dict[str, str]] = None) -> None:
    """Ranges of the numeric flags and the dataset type. A value taken from the
    config file says so, with its line."""
    sources = sources or {}

    def fail(name: str, what: str):
        where = f" (set in {sources[name]})" if name in sources else ""
        raise DataError(f"--{name}", what + where)

    def value(name):
        return getattr(args, name, None)

    if value("dataset_type") is not None and args.dataset_type not in DATASET_TYPES:
        fail("dataset_type", f"unknown '{args.dataset_type}' (one of {', '.join(DATASET_TYPES)})")
    for name in _AT_LEAST_1:
        if value(name) is not None and value(name) < 1:
            fail(name, f"must be at least 1, got {value(name)}")
    for name in _AT_LEAST_0:
        if value(name) is not None and value(name) < 0:
            fail(name, f"must be 0 or more, got {value(name)}")
    for name in _FLOATS_AT_LEAST_0:
        if value(name) is not None and not (math.isfinite(value(name)) and value(name) >= 0):
            fail(name, f"must be a finite number >= 0, got {value(name)}")
    frac = value("precrop_frac")
    if frac is not None and not (0 < frac <= 1):
        fail("precrop_frac", f"must be in (0, 1], got {frac}")
    if value("i_embed") is not None and args.i_embed not in (0, -1):
        fail("i_embed", f"must be 0 (positional encoding) or -1 (none), got {args.i_embed}")
    if value("dataset_type") == "deepvoxels" and value("testskip") == 0:
        fail("testskip", "must be at least 1 for deepvoxels")
    check_sampler(args, fail)


def check_sampler(args, fail) -> None:
    """`--sampler` and the occupancy sampler's flags: ranges, and the combinations it cannot honour."""
    occupancy = getattr(args, "sampler", "hierarchical") == "occupancy"
    resolution = getattr(args, "occupancy_resolution", None)
    if resolution is not None and not 1 <= resolution <= 512:
        fail("occupancy_resolution", f"must be 1 to 512 (cells per axis), got {resolution}")
    if getattr(args, "occupancy_box", None) is not None:
        if not occupancy:
            fail("occupancy_box", "only the occupancy sampler uses a box; add --sampler occupancy")
        if args.dataset_type == "llff" and not args.no_ndc:
            fail("occupancy_box", "forward-facing (NDC) scenes use the NDC cube; drop --occupancy_box or add --no_ndc")
        parse_box(args.occupancy_box)
    if occupancy and getattr(args, "lindisp", False):
        fail("lindisp", "the occupancy sampler marches in equal steps of depth; drop --lindisp "
                        "or use --sampler hierarchical")


def choose_device(flag: Optional[str], local_rank: int = 0, world_size: int = 1):
    """The training device: `--device` (cuda, cuda:1, mps, cpu), else CUDA,
    MPS or the CPU, whichever is present. Under torchrun, a CUDA device
    without an index is the process's LOCAL_RANK-th GPU (round robin when
    there are fewer GPUs than processes on the node)."""
    if flag is None:
        device = default_device()
    else:
        try:
            device = torch.device(flag)
        except RuntimeError:
            raise DataError("--device", f"unknown device '{flag}' (cuda, cuda:N, mps or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError("--device", f"{flag}: CUDA is not available on this machine (torch {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count if world_size > 1 else torch.cuda.current_device())
        if device.index >= count:
            raise DataError("--device", f"{flag}: this machine has {count} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DataError("--device", f"{flag}: Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DataError("--device", f"unsupported device type '{device.type}' (cuda, cuda:N, mps or cpu)")
    if world_size > 1 and device.type == "mps":
        raise DataError("--device", "mps: torch.distributed has no backend for Apple MPS; data-parallel runs "
                                    "use CUDA (NCCL) or the CPU (gloo): add --device cpu, or run one process")
    return device


def check_world_size(args, world_size: int) -> None:
    """Each of the world_size processes renders N_rand / world_size rays a step."""
    if world_size > 1 and args.N_rand % world_size:
        raise DataError("--N_rand", f"{args.N_rand} rays per step do not split evenly over {world_size} processes; "
                                    f"use a multiple of {world_size}")
