"""The live page under a replay: updates per second the browser receives and
draws, and the time from a consumer's commit to the browser receiving it.

A replay (topics and consumer group of its own) runs mid-race at `speed`, with
`consumers` consumers in threads, while headless Chromium holds the page open.
Real F1 car data comes in ~3.8 bursts per second (all cars at once), and each
consumer commits each burst as one batch, so at 1x the page gets about 3.8
updates per second per consumer; faster replays give more.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench.stream_bench import percentiles
from pipeline.kafka.consumer import ConsumeReport, StreamConsumer
from pipeline.kafka.producer import ProduceReport, produce_session
from pipeline.kafka.topics import scratch_topics
from pipeline.live import browser
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db

MID_RACE_S = 5400.0  # session clock: about lap 22 in 2023, all cars on track
WARM_UP_S = 3.0  # consumers join the group and the page connects before the replay


@dataclass
class LiveRun:
    watched: browser.PageWatch
    produced: ProduceReport
    consumed: list[ConsumeReport]
    cars_stored: int  # distinct cars of the run in telemetry_samples


def run(
    settings: Settings,
    export_folder: Path,
    *,
    seconds: float,
    speed: float,
    consumers: int = 1,
    screenshot: Path | None = None,
) -> LiveRun:
    """Watch the page for `seconds` of wall time while the replay runs."""
    with scratch_topics(settings, "live") as scratch:
        run_id = f"live-{uuid.uuid4().hex[:6]}"
        reports: list[ConsumeReport] = []
        threads = [
            threading.Thread(
                target=lambda i=i: reports.append(
                    StreamConsumer(f"live-{i + 1}", settings=scratch).run(
                        until_run=run_id, idle_timeout_s=seconds + 60
                    )
                )
            )
            for i in range(consumers)
        ]
        produced: dict[str, ProduceReport] = {}
        producer = threading.Thread(
            target=lambda: produced.update(
                report=produce_session(
                    export_folder,
                    speed=speed,
                    run_id=run_id,
                    settings=scratch,
                    start_offset_s=MID_RACE_S,
                    duration_s=(seconds + WARM_UP_S) * speed,
                )
            )
        )
        for thread in threads:
            thread.start()
        time.sleep(WARM_UP_S)
        producer.start()
        watched = browser.watch(scratch, seconds, screenshot=screenshot)
        producer.join()
        for thread in threads:
            thread.join()
        with telemetry_db.connect(scratch) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT driver_number) FROM telemetry_samples WHERE run_id = %s",
                (run_id,),
            ).fetchone()
    return LiveRun(watched, produced["report"], reports, int(row[0]) if row else 0)


def figures(live: LiveRun) -> dict[str, Any]:
    watched = live.watched
    return {
        "replay_rate_hz": live.produced.achieved_rate_hz,
        "updates_received": watched.events,
        "updates_per_s": watched.events_per_s,
        "redraws_per_s": watched.renders_per_s,
        **{
            f"commit_to_browser_{name}": value
            for name, value in percentiles(watched.latencies_ms).items()
        },
        "cars_shown": watched.cars_shown,
    }
