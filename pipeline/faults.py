"""Fault-injection points, for the reliability suite (`tests/faults`).

A crash at an exact place (after a batch was consumed but before its commit,
right after a commit, while a rebalance hands partitions over) cannot be hit
reliably with a kill from outside, so the consumer names those places and the
suite asks for a SIGKILL at the Nth pass through one (`FAULT_AT=point:N`). One
point stalls instead (SIGSTOP, as a frozen host or a debugger would): in the
middle of a COPY, where the server waits on the client and no timeout of its own
ends the transaction. Off unless the setting names a point: a check of one
string per pass.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter

from pipeline.settings import Settings

BEFORE_COMMIT = "before_commit"  # a batch consumed and processed, nothing written
AFTER_COMMIT = "after_commit"  # rows and offsets committed, nothing more done
ASSIGNED = "assigned"  # partitions claimed in PostgreSQL, not yet read from Kafka
IN_COPY = "in_copy"  # a batch's transaction open, its offset rows locked, a COPY begun
POINTS = (BEFORE_COMMIT, AFTER_COMMIT, ASSIGNED, IN_COPY)
STALLS = {IN_COPY}  # stopped (SIGSTOP) rather than killed

_passes: Counter[str] = Counter()


def point(settings: Settings, name: str) -> None:
    """Die here, as `kill -9` would (or stall, for a point in STALLS), if the
    settings ask for it at this pass."""
    if not settings.fault_at:
        return
    _passes[name] += 1
    wanted, _, count = settings.fault_at.partition(":")
    if wanted == name and _passes[name] == int(count):
        # To this thread, not the process: a process-wide SIGSTOP may be taken by
        # another thread, and this one would run on (finish its COPY) meanwhile.
        signal.pthread_kill(
            threading.get_ident(), signal.SIGSTOP if name in STALLS else signal.SIGKILL
        )
