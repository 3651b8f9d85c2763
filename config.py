"""Command-line settings: a script's config dataclass made into flags, argparse checks, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from data import DataError


# ----------------------------------------------------------------------------------------------
# Typed configs: each script's settings are one dataclass; its command-line flags are generated
# from the fields, so a flag, its default and its help can never drift apart.
# ----------------------------------------------------------------------------------------------
def arg(default=dataclasses.MISSING, help: str = "", **argparse_kwargs):
    """A config field: its default (none: a required flag), a one-line help, and any extra
    argparse settings (a checking `type`, `choices`, `action`, `nargs`)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


_TYPES = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, cls, default_note=None) -> None:
    """One `--flag-name` per field of the dataclass `cls`. Only flags given on the command line
    reach the namespace (argparse.SUPPRESS), so `config_from_args` can tell them from defaults.
    `default_note(name)` may replace the "(default: ...)" text of a field."""
    for f in dataclasses.fields(cls):
        kwargs = dict(f.metadata)
        note = default_note(f.name) if default_note else None
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        elif note or not (f.default is None or f.default is False):
            kwargs["help"] += f" (default: {note or f.default})"
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            kwargs.setdefault("action", "store_true")
        elif "action" not in kwargs:
            kwargs.setdefault("type", _TYPES.get(kind, str))
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kwargs)
    # read by run_cli before anything else; listed here so that --help shows it and argparse accepts it
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def config_from_args(cls, namespace: argparse.Namespace, **base):
    """cls(**base) with every flag the user gave replacing its field."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**{**base, **given})


# ----------------------------------------------------------------------------------------------
# Command-line checks shared by the scripts: argparse types, so a bad number is refused with the
# flag's name (exit code 2) before anything is loaded.
# ----------------------------------------------------------------------------------------------
def int_at_least(lo: int):
    """argparse type: an int >= lo."""
    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value
    parse.__name__ = "int"   # argparse names the type in its "invalid int value" message
    return parse


def float_in(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in the interval lo..hi (open or closed at either end)."""
    def parse(text: str) -> float:
        value = float(text)
        too_low = value <= lo if lo_open else value < lo
        too_high = value >= hi if hi_open else value > hi
        if not math.isfinite(value) or too_low or too_high:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or hi == math.inf else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


def output_path_problem(path: str | os.PathLike, kind: str) -> str | None:
    """Why `path` cannot be an output of `kind` "dir" or "file" (or None): checked at parse time
    so a typo fails in a second, not after the model has loaded."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        return f"--out {path} exists and is not a folder"
    if kind == "file" and path.is_dir():
        return f"--out {path} is a folder; expected a .jsonl file path"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"--out {path}: {parent} is not a folder"
            if not os.access(parent, os.W_OK):
                return f"--out {path}: {parent} is not writable"
            break
    return None


# ----------------------------------------------------------------------------------------------
# Errors at the command line: a data or configuration error is one line, not a traceback
# ----------------------------------------------------------------------------------------------
DEBUG_ENV = "CLGRPO_DEBUG"   # CLGRPO_DEBUG=1 (or --debug) shows the traceback of such an error
DEBUG_HELP = f"show the Python traceback of a data or configuration error (also {DEBUG_ENV}=1)"
# What a user fixes by changing their input: bad data (DataError), a refused model folder or setting
# (ValueError), a missing or unreadable file or folder (OSError), a package the model needs (ImportError).
USER_ERRORS = (DataError, ValueError, OSError, ImportError)


def debug_requested(argv: list[str] | None = None) -> bool:
    """--debug on the command line, or CLGRPO_DEBUG set to anything but '' or '0'."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(err: BaseException) -> str:
    """`error: MESSAGE` on one line. Our own DataError messages already name the file and the entry
    or line; any other error also names its type, which is then part of what to look up."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, DataError):
        return f"error: {message}"
    return f"error: {type(err).__name__}: {message} (rerun with --debug for the traceback)"


def run_cli(main, argv: list[str] | None = None):
    """main(argv), with a data or configuration error printed as one `error: ...` line on stderr
    and exit status 1 instead of a traceback (the traceback with --debug or CLGRPO_DEBUG=1).
    Any other exception (a bug, out of memory) keeps its traceback: that is what to report."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        if debug_requested(argv):
            raise
        print(error_line(err), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
