"""The commands' entry points. Each imports its module only when it runs, inside the same guard as the
command itself, so that Ctrl-C at any moment (even while torch loads) stops it with one line saying what
was kept, and exit status 130 instead of a traceback."""

from __future__ import annotations

import importlib
import sys

EXIT_INTERRUPTED = 130

COMMANDS = {  # command -> (module with main(), what an interruption leaves behind)
    "mmfuse-daemon": ("mmfuse.daemon.main", "stopped during start-up: nothing was decided, Ray was shut down"),
    "mmfuse-replay": ("mmfuse.daemon.replay", "stopped: what was already sent stays with the daemon"),
    "mmfuse-record": ("mmfuse.daemon.record", "stopped before recording began: nothing was written"),
    "mmfuse-keys": ("mmfuse.daemon.keys", "stopped: no key was written"),
    "mmfuse-train": ("mmfuse.training.train", "stopped: no bundle was written (an earlier one in --out is as it was)"),
    "mmfuse-eval": ("mmfuse.training.evaluate", "stopped: no results were written"),
    "mmfuse-tap": ("mmfuse.daemon.tap", "stopped"),
}


def run(command: str, argv: list[str] | None = None) -> int:
    module, kept = COMMANDS[command]
    try:
        return importlib.import_module(module).main(argv)
    except KeyboardInterrupt:
        print(f"\n{command}: {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


def daemon() -> int:
    return run("mmfuse-daemon")


def replay() -> int:
    return run("mmfuse-replay")


def record() -> int:
    return run("mmfuse-record")


def keys() -> int:
    return run("mmfuse-keys")


def train() -> int:
    return run("mmfuse-train")


def evaluate() -> int:
    return run("mmfuse-eval")


def tap() -> int:
    return run("mmfuse-tap")
