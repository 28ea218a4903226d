"""One truth for compliance: whether a deadline was met, missed, or is still running.

Every figure that says "within SLA", "breached" or "late by" (the weekly digest, the CSV export,
`/replyclock stats`, the App Home and the metrics) asks `sla_outcome`, so they cannot disagree.

The verdict depends only on the stored times, never on whether a sweep happened to run: an answer
stored after its deadline (a backfill, a worker that was down over the deadline) is a breach even
though no breach was ever announced and ``breached_at`` is empty.

Rules, for one deadline ``due_at`` and the response that settles it:

* answered at or before ``due_at``                 -> ``within`` (late by zero);
* answered after ``due_at``                        -> ``breached``, late by answer - deadline;
* not answered, closed by staff                    -> ``not_judged`` (closed without reply: such
  conversations leave every compliance figure);
* not answered, ``now`` after ``due_at``           -> ``breached``, late by now - deadline (so far);
* not answered, deadline still ahead (or now)      -> ``pending``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

__all__ = ["SlaOutcome", "Verdict", "resolution_outcome", "sla_outcome"]

Verdict = Literal["pending", "within", "breached", "not_judged"]

_ZERO = timedelta(0)


@dataclass(frozen=True)
class SlaOutcome:
    """The verdict on one deadline of a conversation.

    Attributes:
        verdict: ``pending``, ``within``, ``breached`` or ``not_judged``.
        due_at: The deadline judged.
        responded_at: The response that settled it, if any.
        late_by: How late: zero unless breached; for an unanswered breach, as of `now`.
    """

    verdict: Verdict
    due_at: datetime
    responded_at: datetime | None
    late_by: timedelta

    @property
    def within(self) -> bool:
        return self.verdict == "within"

    @property
    def breached(self) -> bool:
        return self.verdict == "breached"

    @property
    def judged(self) -> bool:
        """Whether it counts in a compliance share (within or breached)."""
        return self.verdict in ("within", "breached")


def sla_outcome(
    *,
    due_at: datetime,
    responded_at: datetime | None,
    now: datetime,
    closed_at: datetime | None = None,
) -> SlaOutcome:
    """Judge one deadline (see the module docstring for the rules).

    Args:
        due_at: The deadline (first cycle: the first-response deadline the customer was promised).
        responded_at: The human response of that cycle (first cycle: ``first_response_at``).
        now: The instant the verdict is read at (a digest passes its week's end).
        closed_at: When staff closed the conversation, if they did.

    Returns:
        The outcome; an answer is never judged against `now`, only against `due_at`.
    """
    if responded_at is not None:
        if responded_at <= due_at:
            return SlaOutcome("within", due_at, responded_at, _ZERO)
        return SlaOutcome("breached", due_at, responded_at, responded_at - due_at)
    if closed_at is not None:
        return SlaOutcome("not_judged", due_at, None, _ZERO)
    if now > due_at:
        return SlaOutcome("breached", due_at, None, now - due_at)
    return SlaOutcome("pending", due_at, None, _ZERO)


def resolution_outcome(
    *,
    resolution_due_at: datetime,
    first_response_at: datetime | None,
    closed_at: datetime | None,
    waiting_since: datetime | None,
    now: datetime,
) -> SlaOutcome:
    """Judge the resolution target: resolved means closed by staff after a human answer.

    Closed without any answer is not judged (as for responses). While the conversation waits on
    the customer its clock stands still, so it is judged as of the moment the wait began.
    """
    if closed_at is not None and first_response_at is None:
        return SlaOutcome("not_judged", resolution_due_at, None, _ZERO)
    as_of = min(now, waiting_since) if waiting_since is not None and closed_at is None else now
    return sla_outcome(due_at=resolution_due_at, responded_at=closed_at, now=as_of)
