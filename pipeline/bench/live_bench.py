"""The live page under a replay: updates per second the browser receives and
draws, and the time from a consumer's commit to the browser receiving it.

A replay (topics and consumer group of its own) runs mid-race at `speed`, with
`consumers` consumer processes (`f1 consume`, as the demo runs them: the replay's
pacing and the browser driver here do not share their interpreter), while headless
Chromium holds the page open.
Real F1 car data comes in ~3.8 bursts per second (all cars at once), and each
consumer commits each burst as one batch, so at 1x the page gets about 3.8
updates per second per consumer; faster replays give more.

The benchmark watches for a fixed time and reports rates; the test (`min_updates`)
watches until a condition holds instead: the replay is over, the page received at
least that many of its updates and drew the last one it received.

Produce-to-browser per update of the replay: the batch's produce-to-commit (its
p50 and p99, carried in the update) plus that update's commit-to-browser, as the
page received it (the page cannot see each message's produce time).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench import stream_bench
from pipeline.bench.stream_bench import percentiles
from pipeline.kafka.producer import ProduceReport, produce_session
from pipeline.live import browser
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db

if TYPE_CHECKING:
    pass

MID_RACE_S = 5400.0  # session clock: about lap 22 in 2023, all cars on track
WARM_UP_S = 3.0  # consumers join the group and the page connects before the replay
DRAIN_LIMIT_S = 300.0  # the consumers commit the replay's end after it was produced


@dataclass
class LiveRun:
    watched: browser.PageWatch
    produced: ProduceReport
    consumed: list[dict[str, Any]]  # each consumer process's report (ConsumeReport's fields)
    cars_stored: int  # distinct cars of the run in telemetry_samples
    # With `min_updates`: updates of this replay the page received (other replays,
    # the demo's, reach it too), and whether it drew after the last of them.
    run_updates: int | None = None
    run_updates_drawn: bool | None = None
    # Per update of this replay: its batch's produce-to-commit p50 (p99) plus the
    # update's commit-to-browser, ms.
    produce_to_browser_p50_ms: list[float] = field(default_factory=list)
    produce_to_browser_p99_ms: list[float] = field(default_factory=list)


def run(
    settings: Settings,
    export_folder: Path,
    *,
    seconds: float,
    speed: float,
    consumers: int = 1,
    screenshot: Path | None = None,
    min_updates: int | None = None,
    timeout_s: float = 300.0,
) -> LiveRun:
    """Replay `seconds` (wall time at `speed`) and watch the page: for `seconds`,
    or with `min_updates` until the replay is over and the page has received at
    least that many of its updates and drawn the last one (at most `timeout_s`)."""
    with stream_bench.scratch(settings, "live") as scratch, ExitStack() as processes:
        run_id = f"live-{uuid.uuid4().hex[:6]}"
        members = [
            processes.enter_context(stream_bench.ConsumerProcess(
                scratch, f"live-{i + 1}", "--until-run", run_id,
                "--idle-timeout", str(seconds + 60), claim=False, report=True,
            ))
            for i in range(consumers)
        ]  # fmt: skip
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
        stream_bench.wait_for_claims(scratch, members)
        time.sleep(WARM_UP_S)
        # The replay starts once the page listens: a page slow to open (a busy
        # machine, Chromium starting) would otherwise miss a short replay whole.
        mine: dict[str, Any] = {}
        if min_updates is None:
            watched, mine = _watch_for(
                scratch, run_id, seconds, start=producer.start, screenshot=screenshot
            )
        else:
            watched, mine = _watch_until(
                scratch,
                run_id,
                producer.start,
                lambda: not producer.is_alive() and not any(m.running() for m in members),
                min_updates=min_updates,
                timeout_s=timeout_s,
                screenshot=screenshot,
            )
        producer.join()
        for member in members:
            member.wait(DRAIN_LIMIT_S)
        reports = [member.report() for member in members]
        with telemetry_db.connect(scratch) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT driver_number) FROM telemetry_samples WHERE run_id = %s",
                (run_id,),
            ).fetchone()
    return LiveRun(
        watched,
        produced["report"],
        reports,
        int(row[0]) if row else 0,
        run_updates=mine.get("updates"),
        run_updates_drawn=mine.get("drawn"),
        produce_to_browser_p50_ms=mine.get("p50", []),
        produce_to_browser_p99_ms=mine.get("p99", []),
    )


# Counts the updates of one replay as the page gets them: a second listener on the
# page's own EventSource (`source`), after the page's, so the page has taken each in.
# With each, the produce-to-browser of its batch (see the module's docstring).
_COUNT_RUN_JS = """(run) => {
  window.f1run = { updates: 0, lastAt: null, p50: [], p99: [] };
  source.addEventListener("batch", (e) => {
    const update = JSON.parse(e.data);
    if (update.runs.includes(run)) {
      const received = wallMs();
      f1run.updates += 1;
      f1run.lastAt = nowMs(); // lastRender's clock (monotonic)
      const toBrowser = received - update.committed_us / 1000;
      if (update.latency_p50_ms !== null) {
        f1run.p50.push(update.latency_p50_ms + toBrowser);
        f1run.p99.push(update.latency_p99_ms + toBrowser);
      }
    }
  });
}"""
# Drawn: the page rendered after the last update of the replay arrived.
_RUN_STATE_JS = """() => ({
  updates: f1run.updates,
  drawn: f1run.lastAt !== null && lastRender >= f1run.lastAt,
})"""
_RUN_LATENCIES_JS = "() => ({ p50: f1run.p50, p99: f1run.p99 })"


def _watch_for(
    settings: Settings,
    run_id: str,
    seconds: float,
    *,
    start: Callable[[], None],
    screenshot: Path | None,
) -> tuple[browser.PageWatch, dict[str, Any]]:
    """`browser.watch`, counting the replay's own updates too; `start` starts
    the replay once the page listens."""
    with browser.signed_in_page(settings) as page:
        answer = page.goto(f"{settings.airflow_url}/f1/live")
        if answer is None or answer.status != 200:
            raise RuntimeError(f"live page answered {answer and answer.status}")
        page.evaluate(_COUNT_RUN_JS, run_id)
        start()
        page.wait_for_timeout(seconds * 1000)
        state: dict[str, Any] = {**page.evaluate(_RUN_STATE_JS), **page.evaluate(_RUN_LATENCIES_JS)}
        return browser.read_page(page, screenshot), state


def _watch_until(
    settings: Settings,
    run_id: str,
    start: Callable[[], None],
    replay_done: Callable[[], bool],
    *,
    min_updates: int,
    timeout_s: float,
    screenshot: Path | None,
) -> tuple[browser.PageWatch, dict[str, Any]]:
    """Keep the page open until the replay is done and the page has received at
    least `min_updates` of its updates and drawn the last; or `timeout_s` passed
    (the caller checks what it got). `start` starts the replay once the page listens."""
    with browser.signed_in_page(settings) as page:
        answer = page.goto(f"{settings.airflow_url}/f1/live")
        if answer is None or answer.status != 200:
            raise RuntimeError(f"live page answered {answer and answer.status}")
        page.evaluate(_COUNT_RUN_JS, run_id)
        start()
        deadline = time.monotonic() + timeout_s
        while True:
            state: dict[str, Any] = page.evaluate(_RUN_STATE_JS)
            done = replay_done() and state["updates"] >= min_updates and state["drawn"]
            if done or time.monotonic() > deadline:
                break
            page.wait_for_timeout(100)
        state.update(page.evaluate(_RUN_LATENCIES_JS))
        return browser.read_page(page, screenshot), state


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
        # Over the replay's own updates (the page's counters above take every update).
        "produce_to_browser_p50_ms": percentiles(live.produce_to_browser_p50_ms)["p50_ms"],
        "produce_to_browser_p99_ms": percentiles(live.produce_to_browser_p99_ms)["p99_ms"],
        "cars_shown": watched.cars_shown,
    }
