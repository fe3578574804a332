"""The two kinds of failure the command line reports, each as one line and an exit code (no traceback)."""
from __future__ import annotations


class CLIError(Exception):
    """Something went wrong while doing the work (a model that cannot be loaded, a file that cannot be
    written): exit code 1."""

    exit_code = 1


class UsageError(CLIError):
    """The command line asks for something impossible (a bad option value, a layer the model does not have,
    a mode it does not support): exit code 2, like argparse's own usage errors."""

    exit_code = 2


def one_line(message: object) -> str:
    """A message on one line: library errors often span several lines (hub errors, stack hints)."""
    text = " ".join(str(message).split())
    # stg_ext's own errors name the API they come from; on the command line that prefix is noise.
    for prefix in ("stg_ext.apply_stg: ", "stg_ext: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text
