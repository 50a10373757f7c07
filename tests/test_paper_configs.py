"""configs/paper/: the 16 scenes at the NeRF paper's settings, and switches
that the command line can turn off again."""
from pathlib import Path

import pytest

import eval_table
import run_nerf
from nerf import data_checks, flags
from nerf.errors import DataError

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
BLENDER = ("chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship")
LLFF = ("fern", "flower", "fortress", "horns", "leaves", "orchids", "room", "trex")

# The authors' paper_configs (bmild/nerf) and the paper's protocol, written out.
BLENDER_SETTINGS = {"dataset_type": "blender", "half_res": False, "no_batching": True, "use_viewdirs": True,
                    "white_bkgd": True, "lrate_decay": 500, "N_samples": 64, "N_importance": 128,
                    "N_rand": 1024, "N_iters": 500000, "testskip": 1, "raw_noise_std": 0.0,
                    "precrop_iters": 0, "lrate": 5e-4, "netdepth": 8, "netwidth": 256,
                    "netdepth_fine": 8, "netwidth_fine": 256, "perturb": 1.0}
LLFF_SETTINGS = {"dataset_type": "llff", "factor": 4, "llffhold": 8, "no_batching": False, "use_viewdirs": True,
                 "lrate_decay": 250, "raw_noise_std": 1.0, "N_samples": 64, "N_importance": 128,
                 "N_rand": 4096, "N_iters": 200000, "no_ndc": False, "lrate": 5e-4, "netdepth": 8,
                 "netwidth": 256, "netdepth_fine": 8, "netwidth_fine": 256, "perturb": 1.0}


def parse(*argv: str):
    return flags.parse_args(run_nerf.config_parser(), list(argv))


def test_there_is_one_paper_config_per_scene_of_the_paper():
    assert sorted(p.stem for p in PAPER.glob("*.txt")) == sorted(BLENDER + LLFF)
    paper = eval_table.load_paper()["datasets"]
    assert set(BLENDER) == set(paper["blender"]["scenes"]) and set(LLFF) == set(paper["llff"]["scenes"])


@pytest.mark.parametrize("scene", BLENDER + LLFF)
def test_paper_config_has_the_papers_settings_and_its_own_scene(scene):
    path = PAPER / f"{scene}.txt"
    text = path.read_text()
    assert text.startswith("# ") and "bmild/nerf, paper_configs/" in text  # says where it comes from
    args = parse("--config", str(path))
    expected = BLENDER_SETTINGS if scene in BLENDER else LLFF_SETTINGS
    assert {k: getattr(args, k) for k in expected} == expected
    folder = "nerf_synthetic" if scene in BLENDER else "nerf_llff_data"
    assert Path(args.datadir) == Path("./data") / folder / scene
    assert args.expname == f"{scene}_paper"
    # Test set and video once, at the last step: the table is scored there.
    assert args.i_testset == args.N_iters and args.i_video == args.N_iters


def test_paper_configs_evaluate_at_the_papers_resolution(fern_dir, lego_dir):
    """Real data: the image size each config loads is the one paper_results.json gives.
    (The shared lego keeps every 8th test frame only, hence its testskip.)"""
    paper = eval_table.load_paper()["datasets"]
    for scene, datadir, extra in (("fern", fern_dir, []), ("lego", lego_dir, ["--testskip", "8"])):
        args = parse("--config", str(PAPER / f"{scene}.txt"), "--datadir", str(datadir), *extra)
        H, W = data_checks.check_data(args)
        assert {"W": W, "H": H} == paper[args.dataset_type]["resolution"]


def test_switches_can_be_turned_off_on_the_command_line(tmp_path):
    config = tmp_path / "c.txt"
    config.write_text("half_res = True\nwhite_bkgd = True\nno_batching = yes\nuse_viewdirs = False\n")
    args = parse("--config", str(config))
    assert (args.half_res, args.white_bkgd, args.no_batching, args.use_viewdirs) == (True, True, True, False)
    args = parse("--config", str(config), "--half_res", "False", "--white_bkgd=no", "--no_batching", "0",
                 "--use_viewdirs")
    assert (args.half_res, args.white_bkgd, args.no_batching, args.use_viewdirs) == (False, False, False, True)
    # Bare flags and defaults stay as the original's.
    assert parse().half_res is False and parse("--half_res").half_res is True
    args = parse("--render_only", "--render_test", "--factor", "4")
    assert args.render_only and args.render_test and args.factor == 4
    # The paper's lego at half resolution, as the quick config has it.
    assert parse("--config", str(PAPER / "lego.txt"), "--half_res", "True").half_res is True
    with pytest.raises(DataError, match=r"^--half_res: expected one of true, false.*got 'maybe'$"):
        parse("--half_res", "maybe")


def test_args_txt_switches_read_back_as_written(tmp_path):
    """args.txt spells switches True/False; read back as a config they keep their values."""
    args = parse("--config", str(PAPER / "lego.txt"), "--half_res", "False")
    written = tmp_path / "args.txt"
    written.write_text("".join(f"{k} = {getattr(args, k)}\n" for k in
                               ("half_res", "no_batching", "white_bkgd", "render_only", "use_viewdirs")))
    again = parse("--config", str(written))
    for k in ("half_res", "no_batching", "white_bkgd", "render_only", "use_viewdirs"):
        assert getattr(again, k) == getattr(args, k), k
