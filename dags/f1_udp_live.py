"""
### f1_udp_live

Receives the F1 game's live UDP telemetry (F1 24 or F1 25) and analyses it as
it arrives, exactly like a replay: a `listen` task publishes every game session
as a run into the telemetry topic, `consume` tasks (one consumer group with the
replays') store samples, windows, anomalies and predictions, and `verify`
checks every run the listener ended: each delivered sample stored once.

**Point the game at the listener**: in the game, Settings > Telemetry Settings:
UDP Telemetry *On*, UDP IP address = this machine, UDP port = the port of
**Address** (20777 by default), UDP send rate up to 60 Hz, UDP format 2024 or 2025.
The default address, 127.0.0.1:20777, only hears this machine (the PC version
of the game); a console or another PC needs 0.0.0.0:20777 (that opens the port to the
network).

- **Duration**: how long the listener runs (seconds).
- **Forward**: further HOST:PORT addresses that get every datagram unchanged
  (the game sends to one receiver only: a dashboard app, a wheel, a recorder).
- **Replay**: try it without a game: `synthetic:2025` (or `:2024`) sends a
  synthetic 22-car race, or give the path of a recording (`f1 udp record`);
  the listener stops once it is sent.

Consumers run until the listener's time is up (with a replay: at once), then
until 30 s without a message, so the DAG also completes under `airflow dags
test`, which runs the tasks one after another.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

LONG_RUNNING = pendulum.duration(hours=25)  # a day of listening, with margin


@dag(
    dag_id="f1_udp_live",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["f1", "stream", "udp"],
    params={
        "address": Param(
            "", type="string", title="Address",
            description="HOST:PORT to listen on; empty for the UDP_ADDRESS setting "
            "(127.0.0.1:20777).",
        ),
        "duration_s": Param(
            4 * 3600, type="number", exclusiveMinimum=0, maximum=24 * 3600,
            title="Duration (s)", description="How long to listen.",
        ),
        "forward": Param(
            "", type="string", title="Forward to",
            description="Comma-separated HOST:PORT list that also gets every datagram.",
        ),
        "replay": Param(
            "", type="string", title="Replay",
            description="Without a game: synthetic:2025, synthetic:2024 or a recording's path.",
        ),
        "replay_speed": Param(
            1.0, type="number", minimum=0, title="Replay speed",
            description="1 the original pace; 0 unpaced.",
        ),
        "consumers": Param(
            1, type="integer", minimum=1, maximum=4, title="Consumers",
            description="Consumer processes (one carries a 22-car 60 Hz feed).",
        ),
    },
)  # fmt: skip
def f1_udp_live() -> None:
    @task
    def start(params: dict | None = None, run_id: str | None = None) -> dict:  # type: ignore[type-arg]
        """Check the stack and the parameters before anything listens."""
        from pipeline.kafka.client import check_reachable
        from pipeline.settings import get_settings
        from pipeline.sinks.telemetry_db import ensure_schema
        from pipeline.sources.udp_recording import parse_address

        params = params or {}
        settings = get_settings()
        address = params["address"] or settings.udp_address
        for each in [address, *filter(None, params["forward"].split(","))]:
            parse_address(each.strip())
        check_reachable(settings)
        ensure_schema()
        started = pendulum.now("UTC").timestamp()
        members = [f"{run_id}-consumer-{i + 1}" for i in range(int(params["consumers"]))]
        return {"address": address, "started": started, "members": members}

    # A retried listener starts afresh: a session under way becomes a new run as
    # soon as its next Session and Participants packets name it (within 5 s).
    @task(execution_timeout=LONG_RUNNING, retries=2, retry_delay=pendulum.duration(seconds=5))
    def listen(live: dict, params: dict | None = None) -> dict:  # type: ignore[type-arg]
        from dataclasses import asdict

        from pipeline.kafka.client import stop_on_signals
        from pipeline.kafka.udp_listener import UdpListener
        from pipeline.sources.udp_recording import datagram_source

        params = params or {}
        forward = [a.strip() for a in params["forward"].split(",") if a.strip()]
        replay = datagram_source(params["replay"]) if params["replay"] else None
        with stop_on_signals() as stop:
            report = UdpListener(
                live["address"], forward=forward, replay=replay,
                replay_speed=float(params["replay_speed"]) or None, stop=stop,
            ).run(duration_s=float(params["duration_s"]))  # fmt: skip
        if report.delivery_failures:
            raise RuntimeError(f"{report.delivery_failures} deliveries failed: {report.runs}")
        return asdict(report)

    @task
    def members(live: dict) -> list[str]:  # type: ignore[type-arg]
        return list(live["members"])

    @task(
        execution_timeout=LONG_RUNNING, retries=2, retry_delay=pendulum.duration(seconds=5),
        map_index_template="{{ task.op_kwargs['member'].rsplit('-', 1)[-1] }}",
    )  # fmt: skip
    def consume(member: str, live: dict, params: dict | None = None) -> dict:  # type: ignore[type-arg]
        from pipeline.kafka.client import stop_on_signals
        from pipeline.kafka.consumer import StreamConsumer

        params = params or {}
        # Silence is normal while the game is in its menus: idle only counts once
        # the listener's time is up (a replay is sent at once and without pauses).
        ends = live["started"] + float(params["duration_s"])
        listening_left = 0.0 if params["replay"] else ends - pendulum.now("UTC").timestamp()
        with stop_on_signals() as stop:
            report = StreamConsumer(member, stop=stop).run(
                idle_timeout_s=30, idle_from_s=max(0.0, listening_left)
            )
        return report.summary()

    @task(execution_timeout=pendulum.duration(hours=1))
    def verify(listened: dict, consumed: list) -> list:  # type: ignore[type-arg]
        """Every run the listener ended: each delivered sample stored exactly once."""
        from pipeline.kafka.consumer import verify_run

        return [
            verify_run(run["run_id"], delivered=int(run["delivered"])) for run in listened["runs"]
        ]

    live = start()
    listened = listen(live)
    consumed = consume.partial(live=live).expand(member=members(live))
    verify(listened, consumed)


f1_udp_live()
