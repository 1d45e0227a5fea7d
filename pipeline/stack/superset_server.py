"""(being written)"""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.stack.process import ManagedProcess


def prepare(settings: Settings) -> None: ...
def configure(settings: Settings) -> None: ...
def processes(settings: Settings) -> list[ManagedProcess]:
    return []
