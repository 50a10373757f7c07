"""Every program sets OpenMP's passive wait policy before torch loads (OpenMP
reads it only then), unless the user set one."""
import json
import subprocess
import sys
from pathlib import Path

from nerf import omp_wait

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ["run_nerf.py", "view.py", "extract_mesh.py", "bench.py", "reproduce.py", "eval_table.py",
            "imgs2poses.py", "benchmarks/viewer.py"]

# Runs each program's top level in one fresh process until it asks for torch,
# noting OMP_WAIT_POLICY at that moment, and stops it there (torch never loads,
# so every program meets the same fresh start); for a program that imports torch
# only later, the value after its top level ran. argv[1]: the user's value, or "unset".
PROBE = r"""
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())


class TorchRequested(Exception):
    pass


class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise TorchRequested(os.environ.get("OMP_WAIT_POLICY"))
        return None


sys.meta_path.insert(0, Probe())
seen = {}
for program in sys.argv[2:]:
    os.environ.pop("OMP_WAIT_POLICY", None)
    if sys.argv[1] != "unset":
        os.environ["OMP_WAIT_POLICY"] = sys.argv[1]
    sys.modules.pop("nerf.omp_wait", None)
    try:
        runpy.run_path(program, run_name="probe")
        seen[program] = os.environ.get("OMP_WAIT_POLICY")     # torch not imported yet: set by then?
    except TorchRequested as requested:
        seen[program] = requested.args[0]
print(json.dumps(seen))
"""


def policies_when_torch_loads(user_value: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, user_value, *PROGRAMS], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_program_waits_passively_unless_the_user_chose():
    assert policies_when_torch_loads("unset") == {program: "PASSIVE" for program in PROGRAMS}
    assert policies_when_torch_loads("ACTIVE") == {program: "ACTIVE" for program in PROGRAMS}


def test_wait_passively_keeps_a_users_value():
    for environ, expected in (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                              ({"OMP_WAIT_POLICY": ""}, ""), ({"OMP_NUM_THREADS": "1"}, "PASSIVE")):
        environ = dict(environ)
        assert omp_wait.wait_passively(environ) == expected
        assert environ["OMP_WAIT_POLICY"] == expected
