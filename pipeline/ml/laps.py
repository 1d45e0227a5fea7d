"""Lap tables: one row per lap of every race in the FastF1 caches, the models' data.

Sources: the lap-level cache (`FASTF1_LAPS_CACHE_DIR`, 82 races of 2021-2024
without car telemetry) and the telemetry cache (`FASTF1_CACHE_DIR`, the Monaco
races the demo replays). Each race is loaded offline with FastF1 once (laps,
track status, race control; 1-10 s a race) and kept as
`<laps_dir>/<key>.parquet`: its lap context as known at each lap's start
(`pipeline.sources.lap_context`, the same the replayed samples carry), the
track status at the lap's start, whether the race was stopped during it, and
whether each label's event happened on it (`pipeline.ml.labels.lap_events`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.ml.labels import LABELS, SideTables, lap_events
from pipeline.settings import Settings, get_settings
from pipeline.sources.export import session_key
from pipeline.sources.lap_context import lap_context
from pipeline.sources.telemetry_table import race_laps

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LAPS_FORMAT = "2"  # bump when a lap table's columns or meaning change: tables are rebuilt
_EVENT_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}_(?P<event>.+)$")


@dataclass(frozen=True)
class Race:
    year: int
    event: str  # FastF1's event name, e.g. "Bahrain Grand Prix"
    cache_dir: Path

    @property
    def key(self) -> str:
        return session_key(self.year, self.event, "R")


def available_races(settings: Settings | None = None) -> list[Race]:
    """Every race a FastF1 cache holds (a `<year>/<date>_<Event>/<date>_Race` folder),
    in date order; a race in both caches is taken from the telemetry cache."""
    settings = settings or get_settings()
    races: dict[str, tuple[str, Race]] = {}
    for cache in (settings.fastf1_laps_cache_dir, settings.fastf1_cache_dir):
        for folder in sorted(cache.glob("[0-9][0-9][0-9][0-9]/*/*_Race")):
            match = _EVENT_FOLDER.match(folder.parent.name)
            if not match:
                continue
            race = Race(int(folder.parent.parent.name), match["event"].replace("_", " "), cache)
            races[race.key] = (folder.parent.name, race)
    return [race for _, race in sorted(races.values(), key=lambda item: item[0])]


def season(key: str) -> int:
    return int(key.split("_", 1)[0])


def build_lap_table(race: Race) -> pd.DataFrame:
    """Load one race offline (no car telemetry) and make its lap table."""
    import fastf1
    import pandas as pd

    fastf1.Cache.configure(cache_dir=str(race.cache_dir))
    fastf1.Cache.offline_mode(True)
    session = fastf1.get_session(race.year, race.event, "R")
    session.load(laps=True, telemetry=False, weather=False, messages=True)
    laps = session.laps
    context = lap_context(laps, race_laps(session))
    status = session.track_status[["Time", "Status"]].rename(
        columns={"Time": "lap_start", "Status": "track_status"}
    )
    context = pd.merge_asof(
        context.reset_index().sort_values("lap_start"), status.sort_values("lap_start"),
        on="lap_start",
    ).sort_values("index").set_index("index").rename_axis(None)  # fmt: skip
    side = SideTables(
        laps=laps,
        race_control=session.race_control_messages,
        track_status=session.track_status,
        session_start_utc=session_start_utc(session),
    )
    events = lap_events(laps, context, side)
    table = pd.concat([context, events], axis=1)
    table.insert(0, "race", race.key)
    return table


def session_start_utc(session: Any) -> Any:
    """The UTC date of session time 0 (a Timestamp, NaT when nothing anchors it),
    which race control's UTC times need. Offline
    FastF1 has no car data to take it from, so the chequered flag anchors it: race
    control's message (UTC) and the session status `Finished` (session time) mark
    the same moment (within 2.5 s of the car-data t0 on the three Monaco races)."""
    import pandas as pd

    status = session.session_status
    finished = status.loc[status["Status"] == "Finished", "Time"]
    messages = session.race_control_messages
    flag = messages.loc[messages["Message"].astype("string").str.contains("CHEQUERED"), "Time"]
    if len(finished) and len(flag):
        return pd.Timestamp(flag.iloc[0]) - finished.iloc[0]
    starts = (session.laps["LapStartDate"] - session.laps["LapStartTime"]).dropna()
    if len(starts):
        return pd.Timestamp(starts.median())
    log.warning("%s: no anchor for race control's times; its incidents are left out", session)
    return pd.NaT


def lap_tables(
    races: Iterable[Race],
    settings: Settings | None = None,
    on_race: Callable[[Race], None] = lambda race: None,
) -> pd.DataFrame:
    """The lap tables of `races`, built once each and read back afterwards."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings = settings or get_settings()
    folder = settings.laps_dir
    folder.mkdir(parents=True, exist_ok=True)
    tables = []
    for race in races:
        on_race(race)
        path = folder / f"{race.key}.parquet"
        if path.exists():
            meta = pq.read_schema(path).metadata or {}
            if meta.get(b"laps_format") == LAPS_FORMAT.encode():
                tables.append(pd.read_parquet(path))
                continue
        table = build_lap_table(race)
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        arrow = arrow.replace_schema_metadata(
            {**(arrow.schema.metadata or {}), b"laps_format": LAPS_FORMAT.encode()}
        )
        staging = path.with_suffix(".tmp")
        pq.write_table(arrow, staging)
        staging.replace(path)  # a reader never sees half a table
        tables.append(table.reset_index(drop=True))
    if not tables:
        raise ValueError("no races: check FASTF1_LAPS_CACHE_DIR and FASTF1_CACHE_DIR")
    return pd.concat(tables, ignore_index=True)


def base_rates(table: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Per race: laps, positive laps and the base rate of each label."""
    import pandas as pd

    grouped = labels.groupby(table["race"])
    return pd.concat(
        {"laps": grouped.size(), **{f"{c}_positives": grouped[c].sum() for c in LABELS},
         **{f"{c}_rate": grouped[c].mean() for c in LABELS}},
        axis=1,
    )  # fmt: skip
