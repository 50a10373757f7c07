"""Train a NeRF, or render from a trained one: `python run_nerf.py --config configs/fern.txt`.

Command line, model creation and the training loop; the rendering math is in
nerf/rendering.py, the building blocks in run_nerf_helpers.py.
"""
import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import copy
import logging
import os
import re
import signal
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import configargparse
import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nerf import (camera_path, collapse, data_checks, flags, geometry, lpips_vgg, occupancy, outputs, parallel,
                  run_folder, scoring, viewer)
from nerf.checkpoints import (explain_mismatch, find_checkpoint, load_network_state, rng_state, save_checkpoint,
                              set_rng_state, steps_done)
from nerf.datasets import Scene, load_scene
from nerf.errors import DataError, WriteError
from nerf.rendering import batchify, batchify_rays, raw2outputs, render, render_path, render_rays, run_network  # noqa: F401 (public API)
from nerf.rendering import RenderMemory, is_out_of_memory, make_network_query_fn, save_frame
from nerf.ray_batches import ImageRaySampler, RayBatcher, default_device_budget
from run_nerf_helpers import NeRF, default_device, get_embedder, img2mse, keep_freed_memory, mse2psnr, to8b  # noqa: F401 (public API)
from run_nerf_helpers import Embedder, get_rays, get_rays_np, ndc_rays, sample_pdf  # noqa: F401 (public API)

log = logging.getLogger("nerf")


def __getattr__(name: str):
    """The original's module-level names that forks import: `device` (here the
    default device: CUDA, else MPS, else the CPU) and `DEBUG` (False: it only
    switched on NaN printouts, which the non-finite-loss check replaces)."""
    if name == "device":
        return default_device()
    if name == "DEBUG":
        return False
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _FollowedModule(types.ModuleType):
    """run_nerf, whose assignments reach the rendering code: the original
    defined `render_rays`, `raw2outputs` and the rest here and looked them up
    at call time, so forks replace them with `run_nerf.raw2outputs = f`.
    Assigning one of the names in `FOLLOWED` also replaces it in the module
    where the rendering code looks it up (`nerf.rendering`, or
    `run_nerf_helpers` for the helpers it calls)."""
    FOLLOWED = {**dict.fromkeys(("batchify", "run_network", "batchify_rays", "render", "render_rays",
                                 "raw2outputs", "render_path"), "nerf.rendering"),
                **dict.fromkeys(("sample_pdf", "get_rays", "get_rays_np", "ndc_rays"), "run_nerf_helpers")}

    def __setattr__(self, name: str, value) -> None:
        if name in self.FOLLOWED:
            setattr(sys.modules[self.FOLLOWED[name]], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FollowedModule


def optional_str(value: str) -> Optional[str]:
    """A string flag's value, where "None" (as args.txt writes an unset one)
    means unset, as the original reads `ft_path = None`."""
    return None if value == "None" else value


def config_parser() -> configargparse.ArgumentParser:
    """The original's flags and defaults, plus --N_iters, --seed and --debug.
    Every switch (`store_true`) also takes a value, so `--half_res False`
    undoes a config file's `half_res = True`."""
    parser = configargparse.ArgumentParser(allow_abbrev=False)   # --N_iter is a mistake, not --N_iters
    parser.register('action', 'store_true', flags.Switch)
    parser.add_argument('--config', is_config_file=True, help='config file path')
    parser.add_argument("--expname", type=str, help='experiment name')
    parser.add_argument("--basedir", type=str, default='./logs/', help='where to store ckpts and logs')
    parser.add_argument("--datadir", type=str, default='./data/llff/fern', help='input data directory')

    # training options
    parser.add_argument("--netdepth", type=int, default=8, help='layers in network')
    parser.add_argument("--netwidth", type=int, default=256, help='channels per layer')
    parser.add_argument("--netdepth_fine", type=int, default=8, help='layers in fine network')
    parser.add_argument("--netwidth_fine", type=int, default=256, help='channels per layer in fine network')
    parser.add_argument("--N_rand", type=int, default=32 * 32 * 4,
                        help='batch size (number of random rays per gradient step)')
    parser.add_argument("--lrate", type=float, default=5e-4, help='learning rate')
    parser.add_argument("--lrate_decay", type=int, default=250, help='exponential learning rate decay (in 1000 steps)')
    parser.add_argument("--chunk", type=int, default=1024 * 32,
                        help='number of rays processed in parallel, decrease if running out of memory')
    parser.add_argument("--netchunk", type=int, default=1024 * 64,
                        help='number of pts sent through network in parallel, decrease if running out of memory')
    parser.add_argument("--no_batching", action='store_true', help='only take random rays from 1 image at a time')
    parser.add_argument("--no_reload", action='store_true', help='do not reload weights from saved ckpt')
    parser.add_argument("--ft_path", type=optional_str, default=None,
                        help='specific weights npy file to reload for coarse network')
    parser.add_argument("--N_iters", type=int, default=200000, help='number of training steps')
    parser.add_argument("--seed", type=int, default=0, help='seed of the NumPy and torch generators')
    parser.add_argument("--collapse_guard", type=str, default='on', choices=['on', 'off'],
                        help='on: restart from the next seed when a network\'s densities all fell to zero '
                             '(nerf/collapse.py); off: the original\'s behaviour')
    parser.add_argument("--collapse_patience", type=int, default=20,
                        help='steps in a row without a density gradient that count as a collapse')
    parser.add_argument("--collapse_restarts", type=int, default=10, help='restarts before the run gives up')

    # rendering options
    parser.add_argument("--N_samples", type=int, default=64, help='number of coarse samples per ray')
    parser.add_argument("--N_importance", type=int, default=0, help='number of additional fine samples per ray')
    parser.add_argument("--perturb", type=float, default=1., help='set to 0. for no jitter, 1. for jitter')
    parser.add_argument("--use_viewdirs", action='store_true', help='use full 5D input instead of 3D')
    parser.add_argument("--i_embed", type=int, default=0,
                        help='set 0 for default positional encoding, -1 for none')
    parser.add_argument("--multires", type=int, default=10,
                        help='log2 of max freq for positional encoding (3D location)')
    parser.add_argument("--multires_views", type=int, default=4,
                        help='log2 of max freq for positional encoding (2D direction)')
    parser.add_argument("--density_activation", type=str, default='relu', choices=['relu', 'softplus'],
                        help='relu (the original) or softplus: log(1 + exp(sigma - 1)), as mip-NeRF')
    parser.add_argument("--sampler", type=str, default='hierarchical', choices=['hierarchical', 'occupancy'],
                        help='hierarchical: the paper\'s coarse-to-fine samples (the original); occupancy: march '
                             'through an occupancy grid with early termination (nerf/occupancy.py; fewer network queries)')
    parser.add_argument("--occupancy_resolution", type=int, default=128, help='occupancy grid cells per axis')
    parser.add_argument("--occupancy_steps", type=int, default=1024,
                        help='occupancy sampler: marching steps across the grid\'s diagonal')
    parser.add_argument("--occupancy_warmup", type=int, default=16,
                        help='occupancy sampler: steps sampled as hierarchical before the grid is built')
    parser.add_argument("--occupancy_interval", type=int, default=16,
                        help='occupancy sampler: steps between grid updates')
    parser.add_argument("--occupancy_cells", type=int, default=1 << 15,
                        help='occupancy sampler: cells re-evaluated per update (as many again among the occupied)')
    parser.add_argument("--occupancy_box", type=optional_str, default=None,
                        help='occupancy sampler: the grid\'s box "x0 y0 z0 x1 y1 z1" (default: derived from '
                             'the training cameras; forward-facing scenes: the NDC cube)')
    parser.add_argument("--raw_noise_std", type=float, default=0.,
                        help='std dev of noise added to regularize sigma_a output, 1e0 recommended')
    parser.add_argument("--render_only", action='store_true',
                        help='do not optimize, reload weights and render out render_poses path')
    parser.add_argument("--render_test", action='store_true', help='render the test set instead of render_poses path')
    parser.add_argument("--camera_path", type=optional_str, default=None,
                        help='with --render_only: render this camera_path.json (nerfstudio format) instead')
    parser.add_argument("--render_factor", type=int, default=0,
                        help='downsampling factor to speed up rendering, set 4 or 8 for fast preview')
    parser.add_argument("--depth_estimator", type=str, default='median', choices=['median', 'mean'],
                        help="--render_only's depth/<k>.npy: where a ray's opacity reaches half its final value "
                             "(median), or its weighted mean depth")
    parser.add_argument("--mixed_precision", action='store_true',
                        help='run the MLPs under bfloat16 autocast (meant for GPUs; off by default: other arithmetic)')
    parser.add_argument("--compile", action='store_true', help='torch.compile the MLPs (off by default)')
    parser.add_argument("--fast_path", type=str, default='auto', choices=['auto', 'off'],
                        help='auto: the fused MLP (fast_mlp.py) where it computes what NeRF.forward does; off: never')

    # training options
    parser.add_argument("--precrop_iters", type=int, default=0, help='number of steps to train on central crops')
    parser.add_argument("--precrop_frac", type=float, default=.5, help='fraction of img taken for central crops')

    # dataset options
    parser.add_argument("--dataset_type", type=str, default='llff',
                        help='options: llff / blender / deepvoxels / LINEMOD / demo / nerfstudio (a transforms.json)')
    parser.add_argument("--testskip", type=int, default=8,
                        help='will load 1/N images from test/val sets, useful for large datasets like deepvoxels')

    # deepvoxels flags
    parser.add_argument("--shape", type=str, default='greek', help='options : armchair / cube / greek / vase')

    # blender flags
    parser.add_argument("--white_bkgd", action='store_true',
                        help='set to render synthetic data on a white bkgd (always use for dvoxels)')
    parser.add_argument("--half_res", action='store_true', help='load blender synthetic data at 400x400 instead of 800x800')

    # llff flags
    parser.add_argument("--factor", type=int, default=8, help='downsample factor for LLFF images')
    parser.add_argument("--no_ndc", action='store_true',
                        help='do not use normalized device coordinates (set for non-forward facing scenes)')
    parser.add_argument("--lindisp", action='store_true', help='sampling linearly in disparity rather than depth')
    parser.add_argument("--spherify", action='store_true', help='set for spherical 360 scenes')
    parser.add_argument("--llffhold", type=int, default=8,
                        help='will take every 1/N images as LLFF test set, paper uses 8')

    # logging/saving options
    parser.add_argument("--i_print", type=int, default=100, help='frequency of console printout and metric logging')
    parser.add_argument("--i_img", type=int, default=500, help='frequency of tensorboard image logging')
    parser.add_argument("--i_weights", type=int, default=10000, help='frequency of weight ckpt saving')
    parser.add_argument("--i_testset", type=int, default=50000, help='frequency of testset saving')
    parser.add_argument("--i_video", type=int, default=50000, help='frequency of render_poses video saving')
    parser.add_argument("--keep_checkpoints", type=int, default=0,
                        help='keep only the newest K {step}.tar, deleting older ones after each save (0: keep all)')
    parser.add_argument("--debug", action='store_true', help='show tracebacks for input errors')
    parser.add_argument("--no_download", action='store_true',
                        help='never fetch the VGG16 weights LPIPS needs (as does env NERF_NO_DOWNLOAD=1)')

    # live web viewer (requirements-viewer.txt)
    parser.add_argument("--viewer", action='store_true', help='serve the model in the browser while it trains')
    parser.add_argument("--viewer_host", type=str, default='127.0.0.1', help='address the --viewer serves on')
    parser.add_argument("--viewer_port", type=int, default=8080, help='port the --viewer serves on')

    # devices
    parser.add_argument("--device", type=optional_str, default=None,
                        help='cuda, cuda:N, mps or cpu (default: CUDA, else MPS, else the CPU)')
    parser.add_argument("--world_size", type=int, default=None,
                        help='written to args.txt: how many processes trained (torchrun sets the actual number)')
    return parser


def create_nerf(args, device: Optional[torch.device] = None, ckpt: Optional[dict] = None,
                ckpt_path: Optional[Path] = None, search: bool = True):
    """Builds the coarse (and fine) MLPs, their encodings and Adam.

    Restores `ckpt` when given; without one and with `search` (False: the
    caller looked already), looks for a checkpoint itself (ft_path, else the
    newest in basedir/expname, unless no_reload).
    Returns (render_kwargs_train, render_kwargs_test, start, grad_vars,
    optimizer), `start` being the number of training steps already done.
    """
    device = device or default_device()
    embed_fn, input_ch = get_embedder(args.multires, args.i_embed)
    embeddirs_fn, input_ch_views = None, 0
    if args.use_viewdirs:
        embeddirs_fn, input_ch_views = get_embedder(args.multires_views, args.i_embed)
    embed_fn = embed_fn.to(device)
    embeddirs_fn = embeddirs_fn.to(device) if embeddirs_fn is not None else None
    output_ch = 5 if args.N_importance > 0 else 4
    skips = [4]
    model = NeRF(D=args.netdepth, W=args.netwidth, input_ch=input_ch, output_ch=output_ch, skips=skips,
                 input_ch_views=input_ch_views, use_viewdirs=args.use_viewdirs).to(device)
    grad_vars = list(model.parameters())
    model_fine = None
    if args.N_importance > 0:
        model_fine = NeRF(D=args.netdepth_fine, W=args.netwidth_fine, input_ch=input_ch, output_ch=output_ch,
                          skips=skips, input_ch_views=input_ch_views, use_viewdirs=args.use_viewdirs).to(device)
        grad_vars += list(model_fine.parameters())

    compiled = {}
    if getattr(args, 'compile', False):
        compiled = {id(m): torch.compile(m) for m in (model, model_fine) if m is not None}
    network_query_fn = make_network_query_fn(embed_fn, embeddirs_fn, args.netchunk,
                                             getattr(args, 'mixed_precision', False), compiled,
                                             fast=getattr(args, 'fast_path', 'auto') != 'off')

    optimizer = torch.optim.Adam(params=grad_vars, lr=args.lrate, betas=(0.9, 0.999))

    if ckpt is None and search:
        ckpt_path, ckpt = find_checkpoint(Path(args.basedir) / str(args.expname), args.ft_path, args.no_reload)
    start = 0
    if ckpt is not None:
        log.info("reloading from %s", ckpt_path)
        trained_with = ckpt.get("density_activation", "relu")     # the original's checkpoints: relu
        if trained_with != getattr(args, "density_activation", "relu"):
            raise DataError(ckpt_path, f"was trained with --density_activation {trained_with}; "
                                       f"add --density_activation {trained_with}")
        try:
            load_network_state(model, ckpt["network_fn_state_dict"], ckpt_path, "network_fn_state_dict")
            if model_fine is not None:
                if ckpt.get("network_fine_state_dict") is None:
                    raise DataError(ckpt_path, "has no fine network but --N_importance > 0")
                load_network_state(model_fine, ckpt["network_fine_state_dict"], ckpt_path, "network_fine_state_dict")
            try:
                optimizer.load_state_dict(ckpt["optimizer_state_dict"])
            except (KeyError, ValueError) as exc:
                raise DataError(ckpt_path, f"optimizer state does not match the networks ({exc})") from None
        except DataError as err:
            raise explain_mismatch(err, ckpt_path, args) from None
        start = steps_done(ckpt)

    render_kwargs_train = {
        'network_query_fn': network_query_fn,
        'perturb': args.perturb,
        'N_importance': args.N_importance,
        'network_fine': model_fine,
        'N_samples': args.N_samples,
        'network_fn': model,
        'use_viewdirs': args.use_viewdirs,
        'white_bkgd': args.white_bkgd,
        'raw_noise_std': args.raw_noise_std,
    }
    if getattr(args, 'density_activation', 'relu') != 'relu':
        render_kwargs_train['density_activation'] = args.density_activation
    if args.dataset_type != 'llff' or args.no_ndc:
        render_kwargs_train['ndc'] = False
        render_kwargs_train['lindisp'] = args.lindisp
    render_kwargs_test = {k: render_kwargs_train[k] for k in render_kwargs_train}
    render_kwargs_test['network_query_fn'] = copy.copy(network_query_fn)   # renders may lower their own netchunk
    render_kwargs_test['perturb'] = False
    render_kwargs_test['raw_noise_std'] = 0.
    return render_kwargs_train, render_kwargs_test, start, grad_vars, optimizer


def load_for_rendering(args, scene: Scene, device, ckpt: dict, ckpt_path) -> Tuple[dict, int]:
    """A trained run's test-time render kwargs, as --render_only has them, and
    its step: the checkpoint's networks, the scene's near and far, and the
    run's sampler (`occupancy.attach`: the checkpoint's grid, or one built from
    the networks; a network trained with the occupancy sampler lends its fine
    network to the default's coarse pass). For the programs that only render
    a run (view.py, extract_mesh.py)."""
    _, render_kwargs, step, _, _ = create_nerf(args, device, ckpt, ckpt_path)
    render_kwargs.update(near=scene.near, far=scene.far)
    occupancy.attach(args, scene, render_kwargs, render_kwargs, ckpt, ckpt_path, device, rendering_only=True)
    return render_kwargs, step


# --- Outputs -----------------------------------------------------------------

@dataclass
class Run:
    """What a run's renders and outputs need: its flags, scene and folder, the
    training device, this process's ranks, the test-time render kwargs with
    their memory budget, and (rank 0's) TensorBoard writer."""
    args: Any
    scene: Scene
    expdir: Path
    device: torch.device
    ranks: parallel.Ranks
    render_kwargs: dict
    memory: RenderMemory
    writer: Any = None
    lpips_reason_told: bool = False


def write_run_files(args, expdir: Path, notes: Sequence[str] = (), with_config: bool = True) -> None:
    """args.txt (every flag, sorted, then `notes` as `# ` comment lines) and,
    `with_config`, config.txt (a copy of the config file, read first: it may
    be this folder's own args.txt or config.txt)."""
    config = Path(args.config).read_bytes() if args.config is not None and with_config else None
    outputs.make_folder(expdir)
    outputs.write_text(expdir / 'args.txt', ''.join(f'{arg} = {getattr(args, arg)}\n' for arg in sorted(vars(args)))
                       + ''.join(f'# {note}\n' for note in notes))
    if config is not None:
        outputs.write_bytes(expdir / 'config.txt', config)


def write_video(path: Path, frames: np.ndarray, fps: float = 30) -> None:
    """(F, H, W[, 3]) frames in [0, 1] as an mp4 at `fps` frames a second, quality 8."""
    outputs.write_mp4(run_folder.keep_earlier(path), to8b(frames), fps=fps, quality=8)


def normalized_disparity(disps: np.ndarray) -> np.ndarray:
    """Disparity divided by its maximum (all zeros stay zeros)."""
    peak = float(np.max(disps)) if disps.size else 0.0
    return disps / peak if peak > 0 else disps


def render_frames(run: Run, poses: np.ndarray, savedir: Optional[Path] = None,
                  render_factor: int = 0, with_depth: bool = False) -> Tuple[Optional[np.ndarray], ...]:
    """`render_path` over poses (P, 3 or 4, 4), shared among the ranks: rank r
    renders frames r, r + W, ...; rank 0 gathers them in order (and writes
    savedir/{k:03d}.png). Returns (rgbs (P, H, W, 3), disps (P, H, W)), with
    `with_depth` also depths (P, H, W) (see `render_path`), on rank 0, Nones
    on the others. One process renders as it goes."""
    def render_some(selected: np.ndarray, folder: Optional[Path]):
        return render_path(torch.as_tensor(selected, device=run.device), run.scene.hwf, run.scene.K, run.args.chunk,
                           run.render_kwargs, savedir=None if folder is None else str(folder),
                           render_factor=render_factor, memory=run.memory, progress=run.ranks.is_main,
                           with_depth=with_depth, depth_estimator=run.args.depth_estimator)

    if not run.ranks.distributed:
        return render_some(poses, savedir)
    mine = parallel.my_share(len(poses), run.ranks)
    frames = list(zip(mine, *render_some(poses[mine], None))) if mine else []
    gathered = parallel.gather_to_main(frames, run.ranks)
    if gathered is None:
        return (None,) * (3 if with_depth else 2)
    _, *maps = zip(*sorted((f for share in gathered for f in share), key=lambda f: f[0]))
    if savedir is not None:
        for k, rgb in enumerate(maps[0]):
            save_frame(str(savedir), k, rgb)
    return tuple(np.stack(m, 0) for m in maps)


def score_test_views(run: Run, rgbs: np.ndarray, step: int) -> dict:
    """Scores renders of the test views the NeRF paper's way (metrics.json's
    content), prints the summary line and adds the means to TensorBoard."""
    args, scene = run.args, run.scene
    result = scoring.metrics_result(
        step, scene.images[scene.i_test], rgbs,
        scene=scoring.scene_from_datadir(args.datadir), dataset_type=args.dataset_type,
        white_bkgd=args.white_bkgd,
        lpips_scorer=lpips_vgg.default_lpips_scorer(lpips_vgg.downloads_allowed(args.no_download)),
        extra={"expname": args.expname, "factor": args.factor, "half_res": args.half_res,
               "testskip": args.testskip})
    tqdm.write(scoring.summary_line(result, reason=not run.lpips_reason_told))
    run.lpips_reason_told = True      # why LPIPS is n/a: once per run
    if run.writer is not None:
        for tag, value in scoring.tensorboard_scalars(result).items():
            run.writer.add_scalar(tag, value, step)
    return result


def render_only(run: Run, step: int) -> Path:
    """Renders the spiral path (or the test views with --render_test, scored and
    compared with their ground truth; or the cameras of --camera_path) into
    renderonly_{path|test|camera_path}_{step:06d}/ with its frames and video.mp4,
    and depth/{k:03d}.npy (world units along the viewing axis, NaN where opacity
    < 0.5; --depth_estimator) with depth.mp4; an earlier render there is kept
    aside (`keep_earlier`)."""
    args, scene = run.args, run.scene
    poses = scene.poses[scene.i_test] if args.render_test else scene.render_poses
    savedir = run_folder.render_only_dir(run.expdir, args.render_test, step)
    path = camera_path.load_camera_path(args.camera_path) if args.camera_path else None
    if path is not None:
        savedir = run.expdir / f'renderonly_camera_path_{step:06d}'

    def render(folder: Optional[Path]):
        if path is not None:
            return render_camera_path(run, path, folder)
        return render_frames(run, poses, folder, render_factor=args.render_factor, with_depth=True)

    if not run.ranks.is_main:
        render(None)
        return savedir
    with outputs.atomic_path(run_folder.keep_earlier(savedir)) as partial:   # appears complete, or not at all
        rgbs, _, depths = render(outputs.make_folder(partial))
        for k, depth in enumerate(depths):
            outputs.write_npy(outputs.make_folder(partial / 'depth') / f'{k:03d}.npy', depth)
        if args.render_test and not args.render_factor and path is None:
            scoring.save_metrics_json(partial, score_test_views(run, rgbs, step))
            scoring.save_comparisons(partial, rgbs, scene.images[scene.i_test])
    with outputs.warn_on_write_error("the frames are kept"):
        fps = 30 if path is None else path.fps
        write_video(savedir / 'video.mp4', rgbs, fps)
        write_video(savedir / 'depth.mp4', geometry.colour_depth(depths), fps)
    return savedir


def render_camera_path(run: Run, path: camera_path.CameraPath,
                       savedir: Optional[Path]) -> Tuple[Optional[np.ndarray], ...]:
    """`render_frames` for a camera path: each stretch of frames with one field of
    view rendered with its own intrinsics at the path's size. Returns rgbs, disps
    and depths (P, H, W[, 3]) on rank 0 (Nones elsewhere); frames go to savedir."""
    camera_path.check_ndc_camera(path, run.scene, run.render_kwargs.get('ndc', True), run.args.camera_path)
    maps = []
    for k0, k1 in path.constant_fov_stretches():
        K = path.intrinsics(k0)
        view = copy.copy(run)
        view.scene = replace(run.scene, H=path.H, W=path.W, focal=float(K[0, 0]), K=K)
        maps.append(render_frames(view, path.poses[k0:k1], with_depth=True))
    if not run.ranks.is_main:
        return (None,) * 3
    rgbs, disps, depths = (np.concatenate(m, 0) for m in zip(*maps))
    for k, rgb in enumerate(rgbs):
        save_frame(savedir, k, rgb)
    return rgbs, disps, depths


def write_spiral_videos(run: Run, step: int) -> None:
    """{expname}_spiral_{step:06d}_rgb.mp4 and _disp.mp4 along the render path
    (along the test views with --render_test, as in the original)."""
    scene = run.scene
    rgbs, disps = render_frames(run, scene.poses[scene.i_test] if run.args.render_test else scene.render_poses)
    if run.ranks.is_main:
        moviebase = run.expdir / f'{run.args.expname}_spiral_{step:06d}_'
        with outputs.warn_on_write_error():
            write_video(Path(f'{moviebase}rgb.mp4'), rgbs)
            write_video(Path(f'{moviebase}disp.mp4'), normalized_disparity(disps))
            tqdm.write(f"Saved videos {moviebase}rgb.mp4 and {moviebase.name}disp.mp4")


def render_testset(run: Run, step: int) -> None:
    """Renders the test views, reports their scores, then writes the frames and
    metrics.json as testset_{step:06d}/ (a write that fails is a warning: the
    folder is then absent, the scores already reported)."""
    rgbs, _ = render_frames(run, run.scene.poses[run.scene.i_test])
    if not run.ranks.is_main:
        return
    result = score_test_views(run, rgbs, step)
    with outputs.warn_on_write_error(), \
            outputs.atomic_path(run_folder.keep_earlier(run.expdir / f'testset_{step:06d}')) as partial:
        outputs.make_folder(partial)
        for k, rgb in enumerate(rgbs):
            save_frame(partial, k, rgb)
        scoring.save_metrics_json(partial, result)


def log_heldout_view(run: Run, step: int) -> None:
    """TensorBoard: one validation view's RGB, disparity, accumulation and PSNR."""
    scene, writer = run.scene, run.writer
    img_i = int(scene.i_val[(step // run.args.i_img) % len(scene.i_val)])
    c2w = torch.as_tensor(scene.poses[img_i], device=run.device)
    with torch.no_grad():
        rgb, disp, acc, _ = run.memory.run(lambda chunk: render(scene.H, scene.W, scene.K, chunk=chunk, c2w=c2w,
                                                                **run.render_kwargs))
    target = torch.as_tensor(scene.images[img_i], device=run.device)
    writer.add_scalar('heldout/psnr', float(mse2psnr(img2mse(rgb, target))), step)
    writer.add_image('heldout/rgb', rgb.clamp(0, 1).cpu(), step, dataformats='HWC')
    writer.add_image('heldout/disp', (disp / disp.max().clamp(min=1e-10)).cpu(), step, dataformats='HW')
    writer.add_image('heldout/acc', acc.clamp(0, 1).cpu(), step, dataformats='HW')


# --- Training ----------------------------------------------------------------

def learning_rate(args, global_step: int) -> float:
    """lrate * 0.1 ** (global_step / (lrate_decay * 1000))."""
    return args.lrate * (0.1 ** (global_step / (args.lrate_decay * 1000)))


def train_step(batch_rays, target_s, scene: Scene, render_kwargs: dict, optimizer, chunk: int,
               average=None) -> dict:
    """One gradient step on the fine (and coarse) colour MSE.

    `average` (data-parallel runs: a `parallel.GradientAverage` bound to the
    stop request) turns this rank's gradients and losses into their means
    over all the step's rays before Adam's step; its `stop` (a bool) comes
    back in the stats. A rank's share can be empty (an epoch's short last batch): it
    renders nothing and contributes no rays.
    """
    optimizer.zero_grad()
    n_rays = target_s.shape[0]
    if n_rays == 0:
        zero = torch.zeros((), device=target_s.device)
        numbers = {'mse': zero, 'loss': zero, **({'mse0': zero} if render_kwargs['N_importance'] > 0 else {})}
    else:
        rgb, _, _, extras = render(scene.H, scene.W, scene.K, chunk=chunk, rays=batch_rays, retraw=True,
                                   **render_kwargs)
        img_loss = img2mse(rgb, target_s)
        loss = img_loss
        numbers = {'mse': img_loss.detach()}
        if 'rgb0' in extras:
            img_loss0 = img2mse(extras['rgb0'], target_s)
            loss = loss + img_loss0
            numbers['mse0'] = img_loss0.detach()
        loss.backward()
        numbers['loss'] = loss.detach()
    if average is not None:
        numbers = average(numbers, n_rays)
    optimizer.step()
    out = {'loss': numbers['loss'], 'psnr': mse2psnr(numbers['mse'])}
    if 'mse0' in numbers:
        out['psnr0'] = mse2psnr(numbers['mse0'])
    if 'stop' in numbers:
        out['stop'] = numbers['stop']
    return out


def probe_backward(batch_rays, target_s, scene: Scene, render_kwargs: dict, chunk: int) -> None:
    """Backpropagates the colour loss of one batch rendered without noise (no
    stratified jitter, no density noise: no random generator moves), into the
    gradients: the collapse guard's probe of which networks get a density gradient."""
    rgb, _, _, extras = render(scene.H, scene.W, scene.K, chunk=chunk, rays=batch_rays,
                               **{**render_kwargs, 'perturb': 0., 'raw_noise_std': 0.})
    loss = img2mse(rgb, target_s)
    if 'rgb0' in extras:
        loss = loss + img2mse(extras['rgb0'], target_s)
    loss.backward()


class StopRequest:
    """Turns SIGINT / SIGTERM / SIGHUP (a closed terminal, a dropped SSH
    connection) into a flag the loop checks after each step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RenderStop(StopRequest):
    """As StopRequest, for --render_only: the signal stops the render at once
    (as a KeyboardInterrupt, so that its partial folder is removed)."""

    def _handle(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt


def make_sampler(args, scene: Scene, device, ranks: parallel.Ranks = parallel.Ranks(), pinned: bool = False):
    """This rank's share of each step's rays: all images' rays shuffled
    (batching) or one image per step (--no_batching). Processes sharing a
    GPU share its budget for training data too."""
    budget = default_device_budget(device) / parallel.ranks_per_device(device, ranks, pinned)
    if args.no_batching:
        return ImageRaySampler(scene.images, scene.poses, scene.i_train, scene.H, scene.W, scene.K, args.N_rand,
                               args.precrop_iters, args.precrop_frac, device, budget,
                               rank=ranks.rank, world_size=ranks.world_size)
    return RayBatcher(scene.images, scene.poses, scene.i_train, scene.H, scene.W, scene.K, args.N_rand, device,
                      budget, rank=ranks.rank, world_size=ranks.world_size,
                      share_permutation=lambda shuffle: parallel.broadcast_(shuffle, device))


def restore_sampling_state(ckpt: Optional[dict], ckpt_path: Optional[Path], sampler, run: Run, start: int) -> None:
    """The ray sampler's position and the random generators, as the checkpoint
    left them. Each rank restores its own generators when the world size is
    the one saved; otherwise all take rank 0's (the batches stay the same:
    their stream is shared) and ranks 1.. draw their sampling noise from new
    seeds. A fresh run's ranks 1.. seed their noise from --seed and the rank."""
    ranks, seed = run.ranks, run.args.seed
    if ckpt is not None and ckpt.get('sampler_state') is not None:
        try:
            sampler.load_state_dict(ckpt['sampler_state'])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(ckpt_path, f"its ray batcher state does not fit this scene ({exc})") from None
    if ckpt is None or ckpt.get('rng_state') is None:
        if ranks.rank > 0:
            torch.manual_seed(parallel.noise_seed(seed, ranks.rank))
        return
    states = ckpt.get('rng_states') or [ckpt['rng_state']]
    if len(states) == ranks.world_size:
        same_device = set_rng_state(states[ranks.rank], run.device)
    else:
        same_device = set_rng_state(states[0], run.device)
        if ranks.rank > 0:
            torch.manual_seed(parallel.noise_seed(seed, ranks.rank, start))
        if ranks.is_main:
            log.info("%s was written by %d process(es), this run has %d: the ray batches continue as saved; "
                     "the per-process sampling noise is re-seeded", ckpt_path, len(states), ranks.world_size)
    if not same_device and ranks.is_main:
        log.info("%s was written on another kind of device: the sampling noise continues from a fresh stream "
                 "(the ray batches are as saved)", ckpt_path)


def log_progress(writer, bar, stats: dict, lrate: float, step: int) -> None:
    """The original's [TRAIN] line, the progress bar's figures and TensorBoard scalars."""
    loss, psnr = float(stats['loss']), float(stats['psnr'])
    tqdm.write(f"[TRAIN] Iter: {step} Loss: {loss}  PSNR: {psnr}")
    bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{psnr:.2f}")
    writer.add_scalar('train/loss', loss, step)
    writer.add_scalar('train/psnr', psnr, step)
    if 'psnr0' in stats:
        writer.add_scalar('train/psnr0', float(stats['psnr0']), step)
    writer.add_scalar('train/lrate', lrate, step)


def out_of_memory_error(exc: BaseException, args, device) -> DataError:
    """A training step that does not fit the device, as one line."""
    asked = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]?i?B)", str(exc))
    amount = f" (it tried to allocate {asked.group(1)})" if asked else ""
    return DataError("--N_rand", f"a training step of {args.N_rand} rays ran out of memory on {device}{amount}; "
                                 f"lower --N_rand or --netchunk (now {args.netchunk})")


def train(argv=None) -> int:
    """Parses the flags, loads the scene, then trains (or renders with --render_only).
    Returns the process exit status."""
    parser = config_parser()
    args = flags.parse_args(parser, argv)   # config file and flags, as one-line errors
    ranks = parallel.ranks_from_env()             # set by torchrun; rank 0 of 1 otherwise
    flags.check_world_size(args, ranks.world_size)
    device = flags.choose_device(args.device, ranks.local_rank, ranks.world_size)
    args.world_size = ranks.world_size
    if ranks.is_main:
        tqdm.write(f"device: {device}")           # a run's first line (before the demo scene is written)
    data_checks.check_data(args)                   # the data folder, before any image is loaded
    camera_path.check_flag(args)                  # --camera_path's file, before any work
    viewer.check_flag(args)                       # --viewer's port
    run_folder.check_writable(args)               # and where the run will write
    if device.type == "cuda":
        torch.cuda.set_device(device)             # streams, events and new tensors default to this GPU
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)                  # every rank builds the same initial weights

    scene = load_scene(args)
    expdir = Path(args.basedir) / str(args.expname)
    ckpt_path, ckpt = find_checkpoint(expdir, args.ft_path, args.no_reload)
    if args.render_only and ckpt is None:
        raise DataError(expdir, "holds no checkpoint to render (--render_only renders a trained network: "
                                "train first, or name one with --ft_path)")
    render_kwargs_train, render_kwargs_test, start, grad_vars, optimizer = create_nerf(
        args, device, ckpt, ckpt_path, search=False)
    bounds = {'near': scene.near, 'far': scene.far}
    render_kwargs_train.update(bounds)
    render_kwargs_test.update(bounds)
    occupancy.attach(args, scene, render_kwargs_train, render_kwargs_test, ckpt, ckpt_path, device)
    run_folder.check_outputs(args, expdir, ckpt_path, ckpt, start)   # never overwrite an earlier run's work
    pinned = args.device is not None and torch.device(args.device).index is not None   # one GPU for all ranks
    parallel.start(ranks, device, pinned)
    run_folder.check_same_start(parallel.all_gather(start, ranks), expdir)
    parallel.broadcast_parameters(grad_vars, device)
    run = Run(args, scene, expdir, device, ranks, render_kwargs_test,
              RenderMemory(args.chunk, render_kwargs_test['network_query_fn']))

    if args.render_only:
        if ranks.is_main:
            write_run_files(args, expdir, collapse.notes_from_checkpoint(ckpt))
        step = int(ckpt['global_step'])
        try:
            with RenderStop() as stop:
                savedir = render_only(run, step)
        except KeyboardInterrupt:
            if ranks.is_main:
                tqdm.write("Interrupted: the render stopped and its unfinished frames were removed (--render_only "
                           "writes no checkpoint, so nothing else is lost)", file=sys.stderr)
            return 128 + (stop.signum or signal.SIGINT)
        if ranks.is_main:
            tqdm.write(f"Rendered to {savedir} (the video is {savedir / 'video.mp4'})")
        return 0
    if start >= args.N_iters:
        if ranks.is_main:
            tqdm.write(f"{expdir} is already at step {start} of --N_iters {args.N_iters}: nothing was done "
                       "(a larger --N_iters trains on)")
        return 0

    sampler = make_sampler(args, scene, device, ranks, pinned)
    restore_sampling_state(ckpt, ckpt_path, sampler, run, start)
    network_fn, network_fine = render_kwargs_train['network_fn'], render_kwargs_train['network_fine']
    guard = collapse.guard_from_args(args, network_fn, network_fine, optimizer, device, ranks, ckpt, sampler.pixels,
                                     lambda rays, target: probe_backward(rays, target, scene, render_kwargs_train,
                                                                         args.chunk))
    collapsed = guard.start() if start == 0 else None      # a network born dead is drawn again before step 1
    if ranks.is_main:
        write_run_files(args, expdir, guard.notes())
    if collapsed:
        if ranks.is_main:
            tqdm.write(f"error: {collapsed}", file=sys.stderr)
        return 1
    if ranks.is_main:
        run.writer = outputs.EventLog(Path(args.basedir) / 'summaries' / str(args.expname))
    gradient_average = parallel.GradientAverage(grad_vars) if ranks.distributed else None
    newest = ckpt_path   # the newest good checkpoint: named when a save fails or the loss is not finite
    live = viewer.training_viewer(args, scene, render_kwargs_test, device, expdir) if ranks.is_main else None

    def save(step: int) -> Optional[str]:
        """Saves `step`; None, or (rank 0) the one line that says why it could not (earlier files stay as they are)."""
        nonlocal newest
        path = expdir / f'{step:06d}.tar'
        states = parallel.all_gather(rng_state(device), ranks)     # every rank's generators
        occupancy.merge_observations(render_kwargs_train)           # and every rank's share of the grid's
        if ranks.is_main:
            try:
                save_checkpoint(run_folder.keep_earlier(path), step, network_fn, network_fine, optimizer,
                                sampler.state_dict(), states,
                                {**guard.state_dict(), 'density_activation': args.density_activation,
                                 **occupancy.checkpoint_entries(args, render_kwargs_train)})
            except WriteError as err:
                return f"{err}; step {step} is not saved, the newest good checkpoint is {newest or 'none'}"
            tqdm.write(f"Saved checkpoints at {path}")
            run_folder.prune_checkpoints(expdir, args.keep_checkpoints, step)
        newest = path
        return None

    first_bad_step = torch.zeros((), dtype=torch.long, device=device)
    status = 0
    unsaved = None   # why the last step could not be saved
    with StopRequest() as stop, tqdm(range(start + 1, args.N_iters + 1), initial=start, total=args.N_iters,
                                     dynamic_ncols=True, disable=None if ranks.is_main else True) as bar:
        for i in bar:
            batch_rays, target_s = sampler(i)
            occupancy.before_step(render_kwargs_train, i)
            average = None if gradient_average is None else \
                (lambda numbers, n_rays: gradient_average(numbers, n_rays, stop.signum is not None))
            try:
                stats = train_step(batch_rays, target_s, scene, render_kwargs_train, optimizer, args.chunk, average)
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory_error(exc, args, device) from None
            guard.observe()
            collapsed = guard.watch(i)
            if collapsed:
                if ranks.is_main:
                    tqdm.write(f"error: {collapsed}", file=sys.stderr)
                status = 1
                break
            if guard.restarts and guard.restarts[-1]['step'] == i:
                occupancy.restart(render_kwargs_train)
                if ranks.is_main:
                    with outputs.warn_on_write_error():    # the checkpoints record the restart as well
                        write_run_files(args, expdir, guard.notes(), with_config=False)
            if live is not None:
                live.training_step(i, stats)
            first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(stats['loss']),
                                         torch.full_like(first_bad_step, i), first_bad_step)
            for param_group in optimizer.param_groups:
                param_group['lr'] = learning_rate(args, i - 1)
            # Data-parallel runs all stop at the step after the one whose all-reduce carried a rank's request.
            stopping = stats['stop'] if 'stop' in stats else stop.signum is not None

            due = {name: i % getattr(args, f'i_{name}') == 0
                   for name in ('print', 'img', 'weights', 'testset', 'video')}
            last = stopping or i == args.N_iters
            if any(due.values()) or last:
                bad = int(first_bad_step)
                if bad:
                    if ranks.is_main:
                        tqdm.write(run_folder.nonfinite_message(bad, newest), file=sys.stderr)
                    status = 1
                    break
            if due['print'] and ranks.is_main:
                log_progress(run.writer, bar, stats, optimizer.param_groups[0]['lr'], i)
            if due['img'] and ranks.is_main:
                log_heldout_view(run, i)
            if due['weights'] or last:   # the last step is always saved
                failed = save(i)
                if failed and last:
                    unsaved = failed
                elif failed:
                    log.warning("warning: %s; the next save, at step %d, tries again", failed,
                                min(i + args.i_weights, args.N_iters))
            if due['video']:
                write_spiral_videos(run, i)
            if due['testset']:
                render_testset(run, i)
            if stopping:
                if not unsaved:
                    if ranks.is_main:
                        tqdm.write(f"Interrupted: saved step {i} to {newest}")
                    status = 128 + (stop.signum or signal.SIGTERM)
                break
    if run.writer is not None:
        run.writer.close()
    if live is not None:
        live.stop()
    parallel.barrier()      # no rank leaves (and has torchrun end the others) while rank 0 still writes
    if unsaved:
        tqdm.write(f"error: {unsaved}", file=sys.stderr)
        return 1
    return status


def main(argv=None) -> int:
    ranks = parallel.ranks_from_env()
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.ERROR, format='%(message)s')
    if not ranks.is_main:
        sys.stdout = open(os.devnull, 'w')          # rank 0 alone talks; errors still reach stderr
    keep_freed_memory()
    debug = '--debug' in (argv if argv is not None else sys.argv[1:])
    try:
        with logging_redirect_tqdm():   # warnings as whole lines above the progress bar
            return train(argv)
    except DataError as err:
        if debug:
            raise
        # Every rank parses the same flags, but a file (node-local data) may be wrong on one rank alone.
        if ranks.is_main or parallel.started() or not err.where.startswith("--"):
            prefix = "" if ranks.is_main else f"rank {ranks.rank}: "
            print(f"{prefix}error: {err}", file=sys.stderr)
        return 2
    except WriteError as err:   # a file the run cannot go on without (rank 0 alone writes)
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        if ranks.is_main:
            print("error: interrupted before training or rendering started, or after it ended: there was nothing "
                  "to save", file=sys.stderr)
        return 130
    finally:
        parallel.stop()


if __name__ == '__main__':
    sys.exit(main())
