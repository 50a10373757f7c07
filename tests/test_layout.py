"""The repository's layout: the README's Layout table, the names docs/compatibility.md promises, no import cycles."""
import ast
import importlib
import re
from pathlib import Path

import pytest

from conftest import REPO

# What the original's run_nerf_helpers.py defined (SPEC.md section 9): forks import these from it by name.
ORIGINAL_HELPERS = ("img2mse", "mse2psnr", "to8b", "Embedder", "get_embedder", "NeRF", "get_rays", "get_rays_np",
                    "ndc_rays", "sample_pdf")


def section(markdown: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = markdown.index(heading + "\n")
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", markdown[start + len(heading):], re.M)]
    return markdown[start: start + len(heading) + ends[0]] if ends else markdown[start:]


def first_column(table_text: str) -> list:
    rows = [line for line in table_text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [row.split("|")[1] for row in rows[1:]]


def repo_modules() -> dict:
    """Module name -> file for the top level and the nerf package."""
    files = sorted(REPO.glob("*.py")) + sorted((REPO / "nerf").glob("*.py"))
    return {(f.stem if f.parent == REPO else f"nerf.{f.stem}").replace("nerf.__init__", "nerf"): f for f in files}


def imported_modules(path: Path, known: set) -> set:
    """Repository modules `path` imports anywhere in it (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def test_every_file_the_layout_table_names_exists():
    table = section((REPO / "README.md").read_text(), "## Layout")
    named = [path for cell in first_column(table) for path in re.findall(r"`([^`]+)`", cell)]
    assert len(named) >= 20
    missing = [path for path in named if not (REPO / path).exists()]
    assert missing == []


def test_every_python_file_at_the_top_and_in_the_package_is_in_the_layout_table():
    table = section((REPO / "README.md").read_text(), "## Layout")
    named = set(re.findall(r"`([^`]+\.py)`", table))
    files = {f.name for f in REPO.glob("*.py")} | {f"nerf/{f.name}" for f in (REPO / "nerf").glob("*.py")}
    assert files - named == {"nerf/__init__.py"}


def test_the_top_level_holds_at_most_twelve_programs_and_original_files():
    top = sorted(f.name for f in REPO.glob("*.py"))
    assert len(top) <= 12, top
    for original in ("run_nerf.py", "run_nerf_helpers.py", "load_llff.py", "load_blender.py", "load_deepvoxels.py",
                     "load_LINEMOD.py"):
        assert original in top


def test_every_module_opens_with_a_docstring_that_says_its_concern():
    for name, path in repo_modules().items():
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc.splitlines()[0].split()) >= 4, name


def test_no_import_cycles():
    modules = repo_modules()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join(trail + [name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
    # the library never reaches back into the programs at the top
    programs = {"run_nerf", "extract_mesh", "reproduce", "imgs2poses", "eval_table", "bench"}
    for name, deps in graph.items():
        if name.startswith("nerf"):
            assert not deps & programs, (name, deps & programs)


def compatibility_names() -> list:
    table = section((REPO / "docs" / "compatibility.md").read_text(), "## The original's names and keywords (SPEC.md section 9)")
    names = []
    for cell in first_column(table):
        for code in re.findall(r"`([^`]+)`", cell):
            name = re.match(r"[A-Za-z_][\w.]*", code)   # not a returned tuple "(a, b)"
            if name and name.group(0) not in ("fn", "embed", "out_dim", "verbose", "pytest", "gt_imgs"):
                names.append(name.group(0))
    return names


def test_compatibility_table_is_read_whole():
    names = compatibility_names()
    for expected in ("run_nerf.device", "batchify", "render_rays", "raw2outputs", "sample_pdf", "create_nerf", "train",
                     "Embedder", "NeRF.load_weights_from_keras", "ndc_rays"):
        assert expected in names


@pytest.mark.parametrize("name", compatibility_names())
def test_every_name_docs_compatibility_promises_imports(name):
    run_nerf = importlib.import_module("run_nerf")
    helpers = importlib.import_module("run_nerf_helpers")
    parts = name.split(".")
    if parts[0] == "run_nerf":
        parts = parts[1:]
    for module in (run_nerf, helpers) if parts[0] in ORIGINAL_HELPERS else (run_nerf,):
        obj = module
        for part in parts:
            obj = getattr(obj, part)
        assert obj is not None or parts == ["device"]
