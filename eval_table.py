"""Markdown table of test-set scores beside the NeRF paper's.

    python eval_table.py logs/*_test

For each run folder, the newest ``testset_<step>/metrics.json`` or
``renderonly_test_<step>/metrics.json`` (by step) is read; a ``metrics.json``
file, or a folder holding one, may be given instead. Each row has the scene,
step, number of views, the resolution the run was scored at and the paper's,
then PSNR, SSIM and LPIPS with the paper's value for that scene
(``paper_results.json``) and the difference (ours - paper; for LPIPS lower
is better), and whether the row is comparable with the paper (its
resolution and, for Blender, all 200 test views; the notes say why not).
``--means`` adds a mean row per dataset. Bad input prints
``error: <path>: <what>`` on stderr and exits 2.
"""
from __future__ import annotations

import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from nerf.scoring import METRICS_FILENAME, load_metrics

PAPER_RESULTS = Path(__file__).resolve().with_name("paper_results.json")
_TEST_DIR = re.compile(r"^(?:testset|renderonly_test)_(\d+)$")
_DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3}


class InputError(Exception):
    """Bad input for one path; the message says what."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        super().__init__(f"{path}: {what}")
        self.path = str(path)
        self.what = what


def load_paper(path: str | os.PathLike = PAPER_RESULTS) -> dict:
    """The paper's per-scene results (see ``paper_results.json``)."""
    with open(path) as f:
        return json.load(f)


def paper_lookup(paper: dict, scene: str, dataset_type: str | None) -> tuple[dict, dict] | None:
    """``(dataset entry, scene scores)`` for a scene, or None if the paper lacks it.

    The dataset type picks the table; without one, the scene is looked up in all.
    """
    datasets = paper["datasets"]
    keys = [dataset_type] if dataset_type in datasets else list(datasets)
    for key in keys:
        scores = datasets[key]["scenes"].get(scene)
        if scores is not None:
            return datasets[key], scores
    return None


def find_metrics(path: str | os.PathLike) -> Path:
    """The ``metrics.json`` a command-line path stands for.

    A file is taken as is; a folder holding ``metrics.json`` gives that file;
    a run folder gives its newest test folder's (highest step, then newest file).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(path, "no such file or directory")
    if p.is_file():
        return p
    if (p / METRICS_FILENAME).is_file():
        return p / METRICS_FILENAME
    found = []
    for child in p.iterdir():
        m = _TEST_DIR.match(child.name)
        if m and (child / METRICS_FILENAME).is_file():
            f = child / METRICS_FILENAME
            found.append((int(m.group(1)), f.stat().st_mtime, f))
    if not found:
        raise InputError(path, "no testset_*/metrics.json or renderonly_test_*/metrics.json")
    return max(found)[2]


def read_run(path: str | os.PathLike) -> dict:
    """One table row's data from a command-line path (see :func:`find_metrics`)."""
    f = find_metrics(path)
    try:
        m = load_metrics(f)
    except json.JSONDecodeError as exc:
        raise InputError(f, f"not valid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f, f"cannot read ({exc.strerror or exc})") from None
    if not isinstance(m, dict):
        raise InputError(f, "not a metrics object")
    for key in ("scene", "step", "H", "W", "mean"):
        if key not in m:
            raise InputError(f, f"missing field '{key}'")
    mean = m["mean"]
    if not isinstance(mean, dict) or any(k not in mean for k in ("psnr", "ssim")):
        raise InputError(f, "'mean' must hold 'psnr' and 'ssim'")
    for key in ("psnr", "ssim", "lpips"):
        value = mean.get(key)
        if value is not None and not isinstance(value, (int, float)):
            raise InputError(f, f"mean {key} is not a number: {value!r}")
    # <run>/<test folder>/metrics.json, whichever of the three was given.
    run = f.resolve().parent.parent.name
    lp = m.get("lpips") if isinstance(m.get("lpips"), dict) else {}
    return {
        "run": run,
        "file": str(f),
        "scene": str(m["scene"]),
        "dataset_type": m.get("dataset_type"),
        "step": m["step"],
        "n_views": m.get("n_views", len(m.get("views", []))),
        "H": m["H"],
        "W": m["W"],
        "psnr": mean.get("psnr"),
        "ssim": mean.get("ssim"),
        "lpips": mean.get("lpips"),
        "lpips_reason": lp.get("reason"),
    }


def _value(x: float | None, digits: int) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _delta(ours: float | None, paper: float | None, digits: int) -> str:
    if ours is None or paper is None:
        return "n/a"
    d = ours - paper
    if math.isinf(d):
        return "+inf" if d > 0 else "-inf"
    text = f"{d:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text  # no "-0.00"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def compare(row: dict, paper: dict) -> dict:
    """A row of :func:`read_run` with the paper's values beside it.

    Adds ``paper_resolution`` ("WxH" or None), ``paper_<m>`` and ``delta_<m>``
    (ours - paper) for m in psnr, ssim, lpips (None where either is missing),
    ``comparable`` (scored the paper's way: its scene, its resolution and, where
    the paper gives one, its number of test views) and ``why_not`` (the
    reason when not comparable, else None).
    """
    out = dict(row)
    hit = paper_lookup(paper, row["scene"], row["dataset_type"])
    ds, scores = hit if hit is not None else ({}, {})
    res = f"{row['W']}x{row['H']}"
    out["paper_resolution"] = f"{ds['resolution']['W']}x{ds['resolution']['H']}" if ds else None
    for key in _DIGITS:
        ref = scores.get(key)
        out[f"paper_{key}"] = ref
        out[f"delta_{key}"] = None if ref is None or row[key] is None else row[key] - ref
    if hit is None:
        why = f"the paper has no scene '{row['scene']}'"
    elif out["paper_resolution"] != res:
        why = f"scored at {res}, the paper at {out['paper_resolution']} ({ds['name']})"
    elif "test_views" in ds and row["n_views"] != ds["test_views"]:
        why = f"{row['n_views']} test views, the paper {ds['test_views']} (testskip 1)"
    else:
        why = None
    out["comparable"], out["why_not"] = why is None, why
    return out


def mean_rows(compared: Sequence[dict], paper: dict) -> list[dict]:
    """Per dataset type, the mean of :func:`compare` rows and the paper's mean
    over the same scenes (its published mean when all of them are there).

    A mean is None when any of its rows lacks the value; ``comparable`` when
    every row is.
    """
    out = []
    for dataset_type in sorted({r["dataset_type"] for r in compared if r["paper_resolution"]}):
        group = [r for r in compared if r["dataset_type"] == dataset_type and r["paper_resolution"]]
        ds = paper["datasets"][dataset_type]
        scenes = sorted({r["scene"] for r in group})
        complete = set(scenes) == set(ds["scenes"])
        mean = {"run": f"mean {dataset_type}", "scene": f"{len(scenes)} of {len(ds['scenes'])} {ds['name']} scenes",
                "dataset_type": dataset_type, "n_runs": len(group), "scenes": scenes,
                "comparable": all(r["comparable"] for r in group)}
        for key in _DIGITS:
            ours = [r[key] for r in group]
            mean[key] = None if any(v is None for v in ours) else sum(ours) / len(ours)
            ref = ds["mean"][key] if complete else sum(ds["scenes"][s][key] for s in scenes) / len(scenes)
            mean[f"paper_{key}"] = ref
            mean[f"delta_{key}"] = None if mean[key] is None else mean[key] - ref
        out.append(mean)
    return out


def format_table(rows: Sequence[dict], paper: dict, means: bool = False) -> str:
    """The Markdown table (and footnotes) for rows from :func:`read_run`;
    ``means`` adds a mean row per dataset (:func:`mean_rows`)."""
    header = ["Run", "Scene", "Step", "Views", "Resolution", "Paper res.",
              "PSNR", "Paper", "Δ", "SSIM", "Paper", "Δ", "LPIPS", "Paper", "Δ", "Comparable"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 4 + [":---:"] * 2 + ["---:"] * 9 + [":---:"]) + "|"]
    notes: list[str] = []
    no_lpips: dict[str, list[str]] = {}
    compared = [compare(row, paper) for row in rows]
    for row in compared:
        cells = [row["run"], row["scene"], row["step"], row["n_views"], f"{row['W']}x{row['H']}",
                 row["paper_resolution"] or "—", *_score_cells(row), "yes" if row["comparable"] else "no"]
        if not row["comparable"]:
            notes.append(f"- {row['run']}: {row['why_not']}; see docs/evaluation.md.")
        if row["lpips"] is None:
            no_lpips.setdefault(row.get("lpips_reason") or "reason not recorded", []).append(row["run"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for mean in mean_rows(compared, paper) if means else []:
        cells = [mean["run"], mean["scene"], "—", "—", "—", "—", *_score_cells(mean),
                 "yes" if mean["comparable"] else "no"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for reason, runs in no_lpips.items():
        notes.append(f"- {', '.join(runs)}: LPIPS unavailable: {reason}")
    out = "\n".join(lines) + "\n\nΔ = ours - paper (LPIPS: lower is better).\n"
    if notes:
        out += "\n".join(notes) + "\n"
    return out


def _score_cells(row: dict) -> list[str]:
    cells = []
    for key, digits in _DIGITS.items():
        ref = row[f"paper_{key}"]
        cells += [_value(row[key], digits), "—" if ref is None else _value(ref, digits),
                  "—" if ref is None else _delta(row[key], ref, digits)]
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Markdown table of each run's newest test-set metrics beside the NeRF paper's.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folder (logs/<expname>), test folder, or metrics.json")
    parser.add_argument("--paper", default=str(PAPER_RESULTS),
                        help="paper results file (default: %(default)s)")
    parser.add_argument("--means", action="store_true", help="add a mean row per dataset")
    args = parser.parse_args(argv)

    try:
        paper = load_paper(args.paper)
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {args.paper}: cannot read the paper results ({exc})", file=sys.stderr)
        return 2
    rows, failed = [], False
    for path in args.runs:
        try:
            rows.append(read_run(path))
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    if failed:
        return 2
    sys.stdout.write(format_table(rows, paper, args.means))
    return 0


if __name__ == "__main__":
    sys.exit(main())
