"""Fault-injection points, for the reliability suite (`tests/faults`).

A crash at an exact place (after a batch was consumed but before its commit,
right after a commit, while a rebalance hands partitions over) cannot be hit
reliably with a kill from outside, so the consumer names those places and the
suite asks for a SIGKILL at the Nth pass through one (`FAULT_AT=point:N`).
Off unless the setting names a point: a check of one string per pass.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from pipeline.settings import Settings

BEFORE_COMMIT = "before_commit"  # a batch consumed and processed, nothing written
AFTER_COMMIT = "after_commit"  # rows and offsets committed, nothing more done
ASSIGNED = "assigned"  # partitions claimed in PostgreSQL, not yet read from Kafka
POINTS = (BEFORE_COMMIT, AFTER_COMMIT, ASSIGNED)

_passes: Counter[str] = Counter()


def point(settings: Settings, name: str) -> None:
    """Die here, as `kill -9` would, if the settings ask for it at this pass."""
    if not settings.fault_at:
        return
    _passes[name] += 1
    wanted, _, count = settings.fault_at.partition(":")
    if wanted == name and _passes[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
