"""Load a FastF1 session through its cache, with one clear error per bad input."""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

from pipeline.settings import Settings, get_settings

if TYPE_CHECKING:
    import pandas as pd
    from fastf1.core import Session

log = logging.getLogger(__name__)


class SessionNotAvailable(ValueError):
    """The session cannot be loaded; the message says why and what to do."""


def configure_cache(settings: Settings | None = None) -> None:
    import fastf1

    settings = settings or get_settings()
    settings.fastf1_cache_dir.mkdir(parents=True, exist_ok=True)
    fastf1.Cache.configure(cache_dir=str(settings.fastf1_cache_dir))
    fastf1.Cache.offline_mode(settings.fastf1_offline)  # after configure(), as FastF1 asks


def _schedule(year: int, settings: Settings) -> pd.DataFrame:
    import fastf1

    try:
        schedule: pd.DataFrame = fastf1.get_event_schedule(year, include_testing=False)
        return schedule
    except ValueError as err:
        where = "in the offline cache" if settings.fastf1_offline else "from FastF1's sources"
        raise SessionNotAvailable(
            f"no {year} calendar {where} ({settings.fastf1_cache_dir}): check the year"
            + (
                ", or set FASTF1_OFFLINE=false on a machine with internet"
                if settings.fastf1_offline
                else ""
            )
        ) from err


def resolve_event(year: int, event: str, settings: Settings) -> str:
    """The official event name for `event` (name, location or country, any case).
    FastF1's own fuzzy matching would quietly pick *some* event; we refuse instead."""
    schedule = _schedule(year, settings)
    wanted = event.strip().casefold()
    for _, row in schedule.iterrows():
        official = str(row["EventName"])
        names = {str(row[c]).casefold() for c in ("EventName", "Location", "Country")}
        if wanted in names or wanted == official.casefold().removesuffix(" grand prix"):
            return official
    choices = sorted({str(v) for c in ("EventName", "Location") for v in schedule[c]})
    close = difflib.get_close_matches(event, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise SessionNotAvailable(f"no event {event!r} in the {year} calendar.{hint}")


def load_session(
    year: int, event: str, session: str = "R", *, settings: Settings | None = None
) -> Session:
    """A loaded FastF1 session (laps, car data, weather, race control messages)."""
    import fastf1

    settings = settings or get_settings()
    configure_cache(settings)
    name = resolve_event(year, event, settings)
    loaded = fastf1.get_session(year, name, session)
    loaded.load(laps=True, telemetry=True, weather=True, messages=True)
    if not loaded.car_data:
        if settings.fastf1_offline:
            raise SessionNotAvailable(
                f"{year} {name} {session} is not in the offline FastF1 cache "
                f"{settings.fastf1_cache_dir}. Load it once on a machine with internet "
                "(FASTF1_OFFLINE=false) and copy its cache folder here, or set FASTF1_CACHE_DIR."
            )
        raise SessionNotAvailable(f"FastF1 returned no car data for {year} {name} {session}.")
    return loaded
