"""Run model-written programs for pass@1 (HumanEval-style tasks), each in its own subprocess.

Only reached when the user passes --allow-code-execution. Each program runs with `python -I`
(isolated mode: no user site-packages, no PYTHON* variables) in a fresh temporary directory with a
wall-clock timeout; it passes when it exits with status 0. This is a sandbox against accidents
(infinite loops, stray files in the working directory), not against hostile code: run untrusted
models' code in a container.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lrsurgery.progress import bar


def run_program(program: str, timeout: float = 3.0) -> bool:
    """True when `program` runs to completion with exit status 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="lrsurgery-exec-") as folder:
        path = Path(folder) / "program.py"
        path.write_text(program)
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def run_programs(programs: list[str], timeout: float = 3.0, workers: int = 2) -> list[bool]:
    """run_program over a list, `workers` at a time; results in input order."""
    progress = bar(len(programs), desc="execute", unit="prog")
    results: list[bool] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for ok in pool.map(lambda p: run_program(p, timeout), programs):
            results.append(ok)
            progress.update(1)
    progress.close()
    return results
