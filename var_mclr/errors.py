"""Mistakes a user can fix from the message alone, and how every entry point reports them: one line, no traceback.

ConfigError, CheckpointError, a held run directory, a bad flag... all derive from UserError. Entry points wrap their
work in ``reporting_user_errors(args.debug)`` so such an error prints ``error: <message>`` to stderr and exits with
status 2; ``--debug`` (added by ``add_debug_flag``) shows the traceback instead. Anything else is a bug and keeps its
traceback. Imports nothing of ours, so every package layer can use it.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

USER_ERROR_EXIT = 2  # argparse's status for a bad command line: the same kind of mistake


class UserError(Exception):
    """An error whose message names the key, flag or file at fault and what is allowed."""


class ConfigError(UserError, ValueError):
    """A config key, or what it names, cannot be used; the message names the key."""


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    return parser


@contextlib.contextmanager
def reporting_user_errors(debug: bool) -> Iterator[None]:
    """Turn a UserError into one line on stderr and exit status 2 (re-raised as is with debug)."""
    try:
        yield
    except UserError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(USER_ERROR_EXIT) from None
