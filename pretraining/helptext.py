"""Help texts of the command-line tools: each default shown once."""
from __future__ import annotations

import argparse


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already speaks of its default, or there is none
    to show (None, False, an empty list, a required option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text.lower() or action.required or d is None or d is False or d is argparse.SUPPRESS \
                or (isinstance(d, (list, tuple)) and not d):
            return text
        return text + " (default: %(default)s)"
