"""How OpenMP's worker threads wait for work: passively, unless the user chose.

By default an OpenMP thread that runs out of work spins for a while before it
sleeps. On a CPU shared with other busy processes the spinning threads take
the cores the working ones need: on 2 loaded cores the demo trained several
times slower (BENCHMARKS.md, "OpenMP threads on a loaded CPU"). With
OMP_WAIT_POLICY=PASSIVE they sleep at once; the arithmetic, and so every
result, is the same.

OpenMP reads the variable once, when torch loads it, so every program imports
this module before anything that imports torch. A value the user set, even an
empty one, is kept.
"""
import os
from typing import MutableMapping

POLICY = "PASSIVE"


def wait_passively(environ: MutableMapping[str, str] = os.environ) -> str:
    """Sets OMP_WAIT_POLICY to PASSIVE in `environ` unless it holds one; returns the policy in force."""
    return environ.setdefault("OMP_WAIT_POLICY", POLICY)


wait_passively()
