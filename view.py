"""Show a trained NeRF in the browser: `python view.py --config configs/demo.txt`.

Serves the newest checkpoint of the run (or --ft_path) at http://127.0.0.1:8080
(--host, --port) with viser; see nerf/viewer.py. Needs requirements-viewer.txt.
"""
import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import importlib.util
import logging
import sys
from pathlib import Path

from nerf import flags
from nerf.checkpoints import find_checkpoint
from nerf.datasets import load_scene
from nerf.errors import DataError, exit_status
from nerf.viewer import Viewer, check_port
import run_nerf

log = logging.getLogger("nerf")


def view(argv=None) -> int:
    """Loads the run's scene and checkpoint, then serves them until Ctrl-C."""
    parser = run_nerf.config_parser()
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to serve the viewer on")
    parser.add_argument("--port", type=int, default=8080, help="port to serve the viewer on")
    args = flags.parse_args(parser, argv)
    if importlib.util.find_spec("viser") is None:
        raise DataError("view.py", "needs viser: pip install -r requirements-viewer.txt")
    check_port(args.host, args.port)
    device = flags.choose_device(args.device)
    print(f"device: {device}", flush=True)              # first, as run_nerf.py's
    expdir = Path(args.basedir) / str(args.expname)
    ckpt_path, ckpt = find_checkpoint(expdir, args.ft_path, no_reload=False)
    if ckpt is None:
        raise DataError(args.ft_path or expdir, "no checkpoint to show (train the run first, or pass --ft_path)")
    scene = load_scene(args)
    render_kwargs, step = run_nerf.load_for_rendering(args, scene, device, ckpt, ckpt_path)
    viewer = Viewer(scene, render_kwargs, device, expdir, args.host, args.port)
    try:
        print(f"Viewing {ckpt_path} (step {step}) at http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
        viewer.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        viewer.stop()
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return exit_status(view, argv)


if __name__ == "__main__":
    sys.exit(main())
