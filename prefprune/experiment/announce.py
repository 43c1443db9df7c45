"""The retrains a run will do, announced before the first one, and their estimated time once one is timed
(training time taken as proportional to the number of training pairs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["RetrainPlan", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """Seconds as "42 s" or "3.5 min" ("n/a" for None)."""
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


@dataclass
class RetrainPlan:
    """The retrains of one invocation.

    Attributes:
        what: who announces (the log lines start with it).
        pending: training pairs of each retrain still to run.
        done: retrains whose step files are already there (a resume).
    """

    what: str
    pending: list[int]
    done: int = 0
    _timed: bool = field(default=False, repr=False)

    def announce(self, detail: str) -> None:
        """Log how many retrains there are, how many are done and how many will run."""
        logger.info(
            "%s: %d retrains (%s); %d already done, %d to run",
            self.what, self.done + len(self.pending), detail, self.done, len(self.pending),
        )

    def timed(self, seconds: float, n_pairs: int) -> None:
        """After the first retrain of the invocation (`n_pairs` pairs in `seconds`): log the estimated time of
        the others; later calls do nothing."""
        if self._timed or not self.pending:
            return
        self._timed = True
        rest = len(self.pending) - 1
        pairs_left = max(sum(self.pending) - n_pairs, 0)
        logger.info(
            "%s: first retrain %.1f s on %d pairs; the %d left take about %s",
            self.what, seconds, n_pairs, rest, format_duration(seconds * pairs_left / max(n_pairs, 1)),
        )
