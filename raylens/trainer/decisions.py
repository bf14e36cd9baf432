"""What a monitor decides about a run, returned as a value: go on, stop it finished (early
stopping, a debugger rule), or fail it (a diverged loss). Shared by the torch loop and the
scikit-learn family's staged fit, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    CONTINUE = "continue"
    STOP = "stop"
    """End the run as finished (early stopping)."""
    FAIL = "fail"
    """End the run as failed, the reason its error (a diverged loss)."""


@dataclass(frozen=True)
class Decision:
    """What a monitor decided, and why (said to the user when it stops a run)."""

    action: Action = Action.CONTINUE
    reason: str = ""
    rule: str | None = None
    """The debugger's rule that decided (``raylens.trainer.debug``), if one did."""


GO_ON = Decision()
