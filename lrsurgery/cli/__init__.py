"""The `lrsurgery` command line: the Typer app, `--config`, user errors as one line, a module per stage;
each stage's flags are generated from its config dataclasses and its methods' options (cli/options.py)."""

# each module registers its command, in the order `lrsurgery --help` lists them
from lrsurgery.cli import calibrate, init, train, fuse, eval, compare, inspect, assets, presets  # noqa: F401, I001
from lrsurgery.cli.common import app, claim_process

import atexit
import os
import sys
import threading

__all__ = ["app", "main"]


def main() -> None:
    """The console script: `lrsurgery COMMAND ...`.

    A command that ends (done, or refused with its one-line error) exits without tearing the interpreter
    down: once the output is flushed, the exit handlers have run and the other threads have finished,
    nothing is left to do, and freeing torch's and transformers' modules one by one took over a second
    of every short command (an eval, an inspect). A genuine bug still propagates with its traceback.
    """
    claim_process()
    try:
        app(prog_name="lrsurgery")
        code: object = 0
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):  # SystemExit("message"): print it and fail, as the interpreter would
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else 0 if code is None else 1
    for thread in threading.enumerate():  # the interpreter's shutdown waits for these too
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a closed stream
            pass
    os._exit(status)
