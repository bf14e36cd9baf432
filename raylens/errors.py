"""The one exception type for mistakes a user can fix.

A ``UserError`` carries a message that names what is wrong and how to fix it. The CLI prints it
without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
Every layer may raise it, so it lives outside the four packages.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input (spec, data, paths), with the fix in the message."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
