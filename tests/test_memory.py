"""The eval process's allocator policy: freed large buffers are reused, not unmapped and faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, resource
from lrsurgery.io.memory import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # above glibc's largest mmap threshold (32 MiB), like a batch's logits
def faults_of_one_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(ctypes.c_void_p(pointer))
    return after - before
policy = keep_freed_memory()
faults = [faults_of_one_buffer() for _ in range(4)]
print(json.dumps({"policy": policy, "faults": faults, "pages": size // resource.getpagesize()}))
"""


def probe(env: dict[str, str]) -> dict:
    """Run the probe in a fresh interpreter (the policy is process-wide); returns its JSON line."""
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_keep_freed_memory_reuses_a_freed_buffer_and_leaves_a_tuned_malloc_alone():
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    kept = probe(env)
    assert kept["policy"] is True
    # The first buffer faults its pages in; the next ones reuse them (a fault per page each time without the policy).
    assert kept["faults"][0] > kept["pages"] // 2
    assert max(kept["faults"][1:]) < kept["pages"] // 10

    for opt_out in ({"GLIBC_TUNABLES": "glibc.malloc.arena_test=8"}, {"MALLOC_ARENA_MAX_": "2"}):
        default = probe({**env, **opt_out})
        assert default["policy"] is False
        assert min(default["faults"]) > default["pages"] // 2  # glibc's own policy: unmapped on free, faulted again


def test_eval_sets_the_allocator_policy_only_as_the_whole_process(tmp_path, monkeypatch):
    """`lrsurgery eval` changes malloc's process-wide policy when it is the console script's process,
    never under a Python caller (CliRunner here), whose later work may need its freed memory returned."""
    from typer.testing import CliRunner

    import lrsurgery.cli as cli
    import lrsurgery.cli.common as common
    import lrsurgery.io.memory as memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(common, "_WHOLE_PROCESS", False)
    missing = tmp_path / "missing.yaml"  # the command refuses it after the policy decision
    args = ["eval", "smollm2-135m", "--task", str(missing)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code != 0 and "missing.yaml" in result.output
    assert calls == []

    class Exited(Exception):
        pass

    def exit_(status):
        raise Exited(status)

    monkeypatch.setattr(sys, "argv", ["lrsurgery", *args])
    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: None)  # the test session's handlers stay
    # the session's own threads (thread pools of earlier tests) never end: main must not wait for them here
    monkeypatch.setattr(cli.threading, "enumerate", lambda: [cli.threading.current_thread()])
    with pytest.raises(Exited) as done:
        cli.main()
    assert done.value.args[0] != 0
    assert calls == [True]
