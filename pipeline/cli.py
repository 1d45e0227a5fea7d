"""`f1`: the command line for everything a DAG does, plus the local stack."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer

from pipeline.settings import ENV_FILE, Settings, get_settings

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, help="F1 telemetry platform.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack (no Docker).")
app.add_typer(stack_app, name="stack")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # librdkafka repeats a connect failure every 50 ms; the clear error comes from us.
    logging.getLogger("librdkafka").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@stack_app.command("env")
def stack_env() -> None:
    """Write .env (mode 600) with fresh secrets if it is missing or lacks one."""
    from pipeline.stack.envfile import ensure_env_file

    generated = ensure_env_file()
    if generated:
        typer.echo(f"{ENV_FILE}: generated {', '.join(generated)}")
    else:
        typer.echo(f"{ENV_FILE}: present, nothing to generate")


@stack_app.command("env-example")
def stack_env_example() -> None:
    """Rewrite .env.example from the Settings class (run after adding a setting)."""
    from pipeline.stack.envfile import ENV_EXAMPLE, render_env_example

    ENV_EXAMPLE.write_text(render_env_example())
    typer.echo(f"wrote {ENV_EXAMPLE}")


@stack_app.command("up")
def stack_up(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Start just these services.")
    ] = None,
) -> None:
    """Start every service and wait until each is healthy (idempotent)."""
    from pipeline.stack import manager
    from pipeline.stack.envfile import ensure_env_file
    from pipeline.stack.process import StackError

    _setup_logging()
    ensure_env_file()
    settings = get_settings()
    try:
        manager.up(settings, only=set(only) if only else None)
    except StackError as err:
        _fail(str(err))
    _print_status(settings)
    typer.echo(f"\nCredentials: {ENV_FILE} (mode 600). Logs: {settings.log_dir}")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every service of the stack; harmless when nothing runs."""
    from pipeline.stack import manager

    _setup_logging()
    if not ENV_FILE.exists():
        typer.echo("no .env: nothing was ever started here")
        return
    stopped = manager.down(get_settings())
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status() -> None:
    """Each process of the stack: running, healthy, and where."""
    if not ENV_FILE.exists():
        typer.echo("no .env: the stack was never started here (run `make up`)")
        raise typer.Exit(1)
    if not _print_status(get_settings()):
        raise typer.Exit(1)


dashboards_app = typer.Typer(
    no_args_is_help=True, help="Superset dashboards kept as code (superset/bundle)."
)
app.add_typer(dashboards_app, name="dashboards")


@dashboards_app.command("import")
def dashboards_import() -> None:
    """Import superset/bundle into the running Superset (idempotent) and print the URLs."""
    from pipeline.dashboards.bundle import BUNDLE_DIR, BundleError, SupersetError, import_bundle

    try:
        report = import_bundle(get_settings())
    except (BundleError, SupersetError) as err:
        _fail(str(err))
    typer.echo(f"imported {BUNDLE_DIR} in {report.seconds:.1f} s")
    for d in report.dashboards:
        typer.echo(f"  {d.title:<16} {d.charts:>2} charts  {d.url}")
    if report.deleted_charts:
        typer.echo(f"  deleted (no longer in the bundle): {', '.join(report.deleted_charts)}")


@dashboards_app.command("check")
def dashboards_check(
    session: Annotated[
        str | None, typer.Option(help="Session to ask for (default DEMO_SESSION).")
    ] = None,
) -> None:
    """Ask every chart of the bundle that shows a session for its data for one
    session (the chart data API); exit 1 if one fails or answers no rows."""
    from pipeline.dashboards.bundle import (
        SupersetError,
        api_client,
        chart_data,
        session_chart_uuids,
    )

    settings = get_settings()
    session = session or settings.demo_session
    empty = 0
    try:
        with api_client(settings) as client:
            for chart_uuid in session_chart_uuids():
                result = chart_data(client, settings, chart_uuid, session)
                empty += result["rowcount"] == 0
                typer.echo(f"  {result['rowcount']:>6} rows  {result['slice_name']}")
    except SupersetError as err:
        _fail(str(err))
    if empty:
        _fail(f"{empty} chart(s) have no rows for {session}: is a replay of it stored?")


@dashboards_app.command("screenshots")
def dashboards_screenshots(
    out: Annotated[
        Path | None, typer.Option(help="Folder of the PNGs (default .stack/screenshots).")
    ] = None,
) -> None:
    """A PNG of each dashboard and of the live page in the Airflow UI (headless
    Chromium); exit 1 if a chart shows an error."""
    from pipeline.dashboards import screenshots
    from pipeline.dashboards.bundle import SupersetError
    from pipeline.live import browser

    settings = get_settings()
    folder = out or settings.stack_dir / "screenshots"
    try:
        shots = screenshots.take(settings, folder)
    except SupersetError as err:
        _fail(str(err))
    # 20 s on the page: long enough for anomaly alerts to appear beside the cars.
    live_page = browser.screenshot_in_airflow(settings, folder / "live-page.png", wait_s=20)
    typer.echo(f"  {live_page}")
    for shot in shots:
        typer.echo(f"  {shot.path}  {shot.charts} charts, {shot.seconds:.1f} s")
        for chart, error in shot.errors.items():
            typer.secho(f"    {chart}: {' '.join(error.split())[:200]}", fg=typer.colors.RED)
    if any(shot.errors for shot in shots):
        raise typer.Exit(1)


@app.command(
    "airflow",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def airflow_cli(ctx: typer.Context) -> None:
    """The airflow CLI with the stack's configuration, e.g. `f1 airflow dags test f1_export`."""
    import os

    from pipeline.stack import airflow_server

    env = {**os.environ, **airflow_server.environment(get_settings())}
    os.execve(airflow_server.airflow_bin(), [airflow_server.airflow_bin(), *ctx.args], env)


@app.command("export")
def export(
    year: Annotated[
        int | None, typer.Option(help="Season, e.g. 2023. Omit for the three sample races.")
    ] = None,
    event: Annotated[str, typer.Option(help="Event name, location or country.")] = "Monaco",
    session: Annotated[str, typer.Option(help="Session: R, Q, S, FP1...")] = "R",
    csv: Annotated[bool, typer.Option(help="Also write the CSV copy.")] = True,
    skip_existing: Annotated[
        bool, typer.Option(help="Leave sessions that are already exported alone.")
    ] = False,
    resample: Annotated[
        str | None,
        typer.Option(help="Resample each car onto a grid, e.g. 100ms (rows flagged resampled)."),
    ] = None,
) -> None:
    """Export FastF1 sessions to Parquet (+ CSV) with a manifest; print their sample rates."""
    import logging as _logging

    import pandas as pd
    from tqdm import tqdm

    from pipeline.sources.export import (
        EXPORT_STEPS,
        SAMPLE_SESSIONS,
        export_session,
        read_manifest,
        session_key,
    )
    from pipeline.sources.fastf1_session import SessionNotAvailable

    _logging.getLogger("fastf1").setLevel(_logging.ERROR)
    chosen = SAMPLE_SESSIONS if year is None else ((year, event, session),)
    formats = ("parquet", "csv") if csv else ("parquet",)
    for y, e, s in chosen:
        key = session_key(y, f"{e} Grand Prix", s, resample)
        if skip_existing and read_manifest(key):
            typer.echo(f"{key}: already exported, skipped")
            continue
        with tqdm(total=len(EXPORT_STEPS), desc=f"{y} {e} {s}", unit="step") as bar:

            def step(name: str, bar: tqdm = bar) -> None:
                if name != EXPORT_STEPS[0]:
                    bar.update(1)
                bar.set_postfix_str(name)

            try:
                folder = export_session(y, e, s, formats=formats, resample=resample, on_step=step)
            except (SessionNotAvailable, ValueError) as err:
                bar.close()
                _fail(str(err))
            bar.update(bar.total - bar.n)
        manifest = read_manifest(folder.name) or {}
        report = pd.read_parquet(folder / "frequency.parquet")
        interval = manifest["car_data_median_interval_s"]
        typer.echo(
            f"{folder.name}: {manifest['rows']['telemetry']:,} samples of "
            f"{len(manifest['drivers'])} cars -> {folder}\n"
            f"  car data per car: median interval {interval:.3f} s ({1 / interval:.2f} Hz), "
            f"mean {manifest['car_data_mean_rate_hz']:.2f} Hz with gaps, "
            f"{int(report['gaps_over_1s'].median())} gaps > 1 s (median car)"
        )


@app.command("topics")
def topics(
    increase_partitions: Annotated[
        bool, typer.Option(help="Grow a topic that has fewer partitions than the settings.")
    ] = False,
    update_config: Annotated[
        bool, typer.Option(help="Apply the spec's config to a topic that differs.")
    ] = False,
) -> None:
    """Create the platform's topics (idempotent) and show them as the broker has them."""
    from pipeline.kafka.client import KafkaUnavailable, check_reachable
    from pipeline.kafka.topics import TopicMismatch, admin_client, provision, topic_specs

    settings = get_settings()
    try:
        check_reachable(settings)
        reports = provision(
            admin_client(settings), topic_specs(settings),
            increase_partitions=increase_partitions, update_config=update_config,
        )  # fmt: skip
    except (KafkaUnavailable, TopicMismatch) as err:
        _fail(str(err))
    for r in reports:
        config = ", ".join(f"{k}={v}" for k, v in sorted(r.config.items()))
        typer.echo(f"  {r.name:<24} {r.action:<22} {r.partitions} partitions  {config}")


def _export_folder(session: str) -> Path:
    folder = get_settings().export_dir / session
    if not (folder / "manifest.json").exists():
        _fail(
            f"no export named {session!r} in {folder.parent}; export it first "
            "(e.g. `f1 export --year 2023 --event Monaco --session R`)"
        )
    return folder


@app.command("produce")
def produce(
    session: Annotated[str, typer.Option(help="Export to replay.")] = "2023_Monaco_R",
    speed: Annotated[
        float, typer.Option(help="Session seconds per wall second; 0 for as fast as possible.")
    ] = 1.0,
    start_offset: Annotated[float, typer.Option(help="Skip this much session time (s).")] = 0.0,
    duration: Annotated[
        float | None, typer.Option(help="Replay only this much session time (s).")
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Name of the run (default: session@time-random).")
    ] = None,
) -> None:
    """Replay an exported session into the telemetry topic (SIGTERM/Ctrl-C: flush, stop)."""
    from tqdm import tqdm

    from pipeline.kafka.client import KafkaUnavailable, stop_on_signals
    from pipeline.kafka.producer import produce_session

    _setup_logging()
    folder = _export_folder(session)
    with stop_on_signals() as stop, tqdm(unit=" samples", desc=session) as bar:
        try:
            report = produce_session(
                folder, speed=speed or None, run_id=run_id, start_offset_s=start_offset,
                duration_s=duration, stop=stop, on_progress=bar.update,
            )  # fmt: skip
        except (KafkaUnavailable, ValueError) as err:
            bar.close()
            _fail(str(err))
    intended = f"{report.intended_rate_hz:,.0f}/s" if report.intended_rate_hz else "unpaced"
    typer.echo(
        f"run {report.run_id}: {report.delivered:,} of {report.planned:,} samples delivered, "
        f"{report.failed:,} failed, in {report.seconds:,.1f} s\n"
        f"  rate: intended {intended}, achieved {report.achieved_rate_hz:,.0f}/s; "
        f"per partition {report.per_partition}"
        + ("\n  stopped early on request" if report.stopped_early else "")
    )
    if report.failed:
        for error, count in report.errors.most_common(5):
            typer.echo(f"  {count:,} x {error}", err=True)
        raise typer.Exit(1)


@app.command("consume")
def consume(
    member: Annotated[str, typer.Option(help="This consumer's name in the group.")] = "",
    until_run: Annotated[
        str | None, typer.Option(help="Stop once this run is complete (all end markers).")
    ] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without a message.")
    ] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
    report_file: Annotated[
        Path | None,
        typer.Option("--report", help="Write the report as JSON here, every latency included."),
    ] = None,
) -> None:
    """Consume the telemetry topic in the group: anomalies, windows, rows to PostgreSQL."""
    import dataclasses
    import json
    import os
    import socket

    from pipeline.kafka.client import KafkaUnavailable, stop_on_signals
    from pipeline.kafka.consumer import DatabaseUnavailable, DeadLettersUndelivered, StreamConsumer

    _setup_logging()
    member = member or f"{socket.gethostname()}-{os.getpid()}"
    with stop_on_signals() as stop:
        try:
            report = StreamConsumer(member, stop=stop, keep_latencies=bool(report_file)).run(
                until_run=until_run, idle_timeout_s=idle_timeout, max_seconds=max_seconds
            )
        except (KafkaUnavailable, DatabaseUnavailable, DeadLettersUndelivered) as err:
            _fail(str(err))
    if report_file:
        report_file.write_text(json.dumps(dataclasses.asdict(report)))
    typer.echo(
        f"{member}: {report.messages:,} messages in {report.batches:,} batches, "
        f"{report.messages_per_s:,.0f}/s; {report.samples:,} samples stored, "
        f"{report.windows:,} windows, {report.anomalies:,} anomalies, "
        f"{report.dead_letters:,} dead letters {dict(report.dead_letter_reasons)}, "
        f"{report.duplicates:,} duplicates skipped ({report.clashes:,} rows already stored), "
        f"{report.late:,} late, {report.broker_errors:,} broker errors, "
        f"{report.db_retries:,} database retries; stopped: {report.stop_reason}"
    )


@app.command("demo")
def demo() -> None:
    """Start the demo replay (f1_stream), the game listener (f1_udp_live) and, when
    the models are not trained, the training (f1_train) in Airflow, unless running."""
    from mlflow.exceptions import MlflowException

    from pipeline.demo import (
        STREAM_DAG,
        TRAIN_DAG,
        UDP_DAG,
        start_demo,
        start_training,
        start_udp_live,
    )

    settings = get_settings()
    try:
        run = start_demo(settings)
        live = start_udp_live(settings)
        training = start_training(settings)
    except (TimeoutError, httpx.HTTPError, MlflowException) as err:
        _fail(f"could not start the demo: {err}")
    state = "already running" if run["already_running"] else "started"
    speed = f"{settings.demo_speed:g}x" if settings.demo_speed else "as fast as possible"
    host, _, port = settings.udp_address.rpartition(":")
    typer.echo(
        f"\nDemo replay {state}: {settings.demo_session} at {speed}, "
        f"{settings.demo_consumers} consumers (DAG run {run['dag_run_id']}).\n"
        f"  Live page:  {settings.airflow_url}/plugin/f1-live  (Airflow login)\n"
        f"  Dashboards: {settings.superset_url}/dashboard/list/  (Superset login)\n"
        f"  The DAG:    {settings.airflow_url}/dags/{STREAM_DAG}\n"
        f"\nF1 game listener {'already running' if live['already_running'] else 'started'} "
        f"on {settings.udp_address} ({settings.airflow_url}/dags/{UDP_DAG}).\n"
        f"  In F1 24/25: Settings > Telemetry Settings: UDP Telemetry On, UDP IP Address "
        f"{host}, UDP Port {port},\n  UDP Send Rate 60Hz, UDP Format 2024 or 2025. "
        "A console or another PC: set UDP_ADDRESS=0.0.0.0:" + port + " in .env first.\n"
        f"  No game? `.venv/bin/f1 udp replay {settings.udp_recording}` sends a real lap."
    )
    if training is not None:
        typer.echo(
            f"\nModels: training on every race in Airflow ({settings.airflow_url}/dags/"
            f"{TRAIN_DAG}, one model after another); each swaps into the demo when registered.\n"
            f"  Meanwhile the predictions stay empty. Runs: {settings.mlflow_tracking_uri}"
        )


@app.command("train")
def train(
    model: Annotated[
        list[str] | None, typer.Option(help="pit_stop, tire_failure, crash_risk (default all).")
    ] = None,
    horizon_laps: Annotated[
        int, typer.Option(help="Label horizon: the event on this lap (1) or within n laps.")
    ] = 1,
    race: Annotated[
        list[str] | None,
        typer.Option(help="Race key to use, e.g. 2023_Bahrain_R (repeat; default every race)."),
    ] = None,
    test_season: Annotated[int, typer.Option(help="Its races are the test races.")] = 2024,
    test_race: Annotated[
        list[str] | None, typer.Option(help="Test race instead of the season's (repeat).")
    ] = None,
    skip_if_trained: Annotated[
        bool, typer.Option(help="Do nothing when every model has a servable champion.")
    ] = False,
) -> None:
    """Train the models on every race's laps (leave-one-race-out selection, a test
    season nothing chose on), track them in MLflow, register and promote."""
    from tqdm import tqdm

    from pipeline.ml.labels import LABELS
    from pipeline.ml.laps import Race
    from pipeline.ml.train import TrainConfig, build_data, needs_training, split_races, train_one

    _setup_logging()
    logging.getLogger("fastf1").setLevel(logging.ERROR)  # offline: no Ergast, said per race
    settings = get_settings()
    if skip_if_trained and not needs_training(settings):
        typer.echo("every model has a champion of the current features; skipped")
        return
    unknown = set(model or ()) - set(LABELS)
    if unknown:
        _fail(f"unknown model {sorted(unknown)}; choose from {', '.join(LABELS)}")
    config = TrainConfig(
        races=tuple(race or ()), test_season=test_season, test_races=tuple(test_race or ()),
        horizon_laps=horizon_laps,
    )  # fmt: skip
    try:
        split, races = split_races(config, settings)
    except ValueError as err:
        _fail(str(err))
    with tqdm(total=len(races), desc="lap tables", unit="race") as bar:

        def tick(race: Race, bar: tqdm = bar) -> None:
            bar.update(1)
            bar.set_postfix_str(race.key)

        data = build_data(races, config.horizon_laps, settings, on_race=tick)
    typer.echo(
        f"{len(data):,} laps: {len(split.development)} development races, "
        f"{len(split.test)} test races, {split.held_out} held out (the demo race)"
    )
    for label in model or LABELS:
        result = train_one(label, data, split, config, settings)
        m = result.metrics
        typer.echo(f"{label}: {result.status}")
        if m:
            typer.echo(
                f"  test PR-AUC {m['test_pr_auc']:.4f} (baseline {m['baseline_test_pr_auc']:.4f}, "
                f"base rate {m['test_base_rate']:.4f}), ROC-AUC {m['test_roc_auc']:.4f}, "
                f"Brier {m['test_brier']:.5f}; cross-validated PR-AUC {m['cv_pr_auc']:.4f} "
                f"(baseline {m['baseline_cv_pr_auc']:.4f}); threshold {m['threshold']:.3f}, "
                f"confusion on test {result.confusion}\n"
                f"  v{result.version} -> {result.alias}: {result.reason}"
            )
        else:
            typer.echo(f"  {result.reason}")


models_app = typer.Typer(no_args_is_help=True, help="The served models, scored live.")
app.add_typer(models_app, name="models")


@models_app.command("score")
def models_score(run: Annotated[str, typer.Argument(help="Stream run id.")]) -> None:
    """Score a run's served predictions whose outcome is known (champion and challenger)."""
    from pipeline.ml.live_scores import score_run

    _setup_logging()
    try:
        rows = score_run(run)
    except ValueError as err:
        _fail(str(err))
    for r in rows:
        pr_auc = "-" if r["pr_auc"] is None else f"{r['pr_auc']:.3f}"
        typer.echo(
            f"{r['label']:13} {r['role']:10} v{r['version']:<3} {r['laps']:5} laps, "
            f"{r['positives']:3} positive, PR-AUC {pr_auc}, Brier {r['brier']:.4f}, "
            f"{r['alerts']} alerts ({r['alert_hits']} right)"
        )


@models_app.command("compare")
def models_compare(
    run: Annotated[
        str | None, typer.Option(help="Stream run id (default: the last one scored).")
    ] = None,
) -> None:
    """Champion and challenger side by side: training's scores and the run's live ones."""
    import pandas as pd

    from pipeline.ml.live_scores import compare, latest_scored_run

    chosen = run or latest_scored_run()
    if chosen is None:
        _fail("no run has live scores yet: replay a race (make up) or `f1 models score RUN`")
    table = compare(chosen)
    if table.empty:
        _fail("no champion or challenger registered: run `f1 train` or the f1_train DAG")
    typer.echo(f"run {chosen}\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


udp_app = typer.Typer(no_args_is_help=True, help="The F1 game's live UDP telemetry.")
app.add_typer(udp_app, name="udp")
Address = Annotated[str, typer.Option(help="HOST:PORT (default: the UDP_ADDRESS setting).")]


def _counted(items: Iterable[T], bar: Any) -> Iterator[T]:
    """Items passed through, each one ticking the progress bar."""
    for item in items:
        bar.update(1)
        yield item


@udp_app.command("listen")
def udp_listen(
    address: Address = "",
    forward: Annotated[
        list[str] | None,
        typer.Option(help="Also send every datagram, unchanged, to HOST:PORT (repeatable)."),
    ] = None,
    record: Annotated[
        Path | None, typer.Option(help="Also write every datagram to this recording.")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    report_json: Annotated[
        Path | None, typer.Option(help="Also write the final report to this JSON file.")
    ] = None,
) -> None:
    """Receive the game's telemetry and publish each session as a run (Ctrl-C stops).
    In the game: Settings > Telemetry Settings > UDP Telemetry On, IP address and
    port of this listener, UDP format 2024 or 2025, send rate up to 60 Hz."""
    from pipeline.kafka.client import KafkaUnavailable, stop_on_signals
    from pipeline.kafka.udp_listener import UdpListener

    _setup_logging()
    with stop_on_signals() as stop:
        try:
            listener = UdpListener(address or None, forward=forward, record=record, stop=stop)
            report = listener.run(duration_s=duration)
        except (KafkaUnavailable, ValueError, OSError) as err:
            _fail(str(err))
    if report_json is not None:
        import json
        from dataclasses import asdict

        report_json.write_text(json.dumps(asdict(report), indent=1))
    parsed = sum(v for k, v in report.datagrams.items() if k.startswith("parsed:"))
    typer.echo(
        f"{report.received:,} datagrams received on {report.address} in {report.seconds:,.0f} s: "
        f"{parsed:,} parsed, {report.received - parsed:,} skipped "
        f"{ {k: v for k, v in report.datagrams.items() if not k.startswith('parsed:')} }\n"
        f"  {report.samples_produced:,} samples produced, {report.samples_delivered:,} delivered, "
        f"{report.delivery_failures:,} failed; "
        f"receive-to-produce ms {report.receive_to_produce_ms}\n"
        f"  forwarded {report.forwarded:,} ({report.forward_errors:,} errors), "
        f"recorded {report.recorded:,}; feed {report.feed}; stopped: {report.stop_reason}"
    )
    for run in report.runs:
        typer.echo(f"  run {run['run_id']}: {run['delivered']:,} samples, ended: {run['ended']}")
    if report.delivery_failures:
        raise typer.Exit(1)


@udp_app.command("record")
def udp_record(
    output: Annotated[Path, typer.Argument(help="Recording to write (f1-udp container format).")],
    address: Address = "",
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Record the game's datagrams, unchanged, without publishing them (Ctrl-C stops)."""
    from pipeline.kafka.client import stop_on_signals
    from pipeline.sources.udp_recording import parse_address, record

    _setup_logging()
    try:
        target = parse_address(address or get_settings().udp_address)
        with stop_on_signals() as stop:
            count = record(output, target, duration_s=duration, stop=stop)
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo(f"{count:,} datagrams recorded to {output}")


@udp_app.command("replay")
def udp_replay(
    recording: Annotated[Path, typer.Argument(help="A recording (f1-udp container format).")],
    address: Address = "",
    speed: Annotated[
        float, typer.Option(help="1 the original pace, 10 ten times faster, 0 unpaced.")
    ] = 1.0,
) -> None:
    """Send a recording's datagrams to a UDP address, as the game would."""
    from tqdm import tqdm

    from pipeline.sources.udp_recording import (
        RecordingDamaged,
        parse_address,
        read_recording,
        send_datagrams,
    )

    try:
        target = parse_address(address or get_settings().udp_address)
        with tqdm(unit=" datagrams", desc=recording.name) as bar:
            report = send_datagrams(
                _counted(read_recording(recording), bar),
                target, speed=speed or None,
            )  # fmt: skip
    except (ValueError, OSError, RecordingDamaged) as err:
        _fail(str(err))
    typer.echo(
        f"{report.sent:,} datagrams ({report.bytes_sent:,} bytes) sent to {target[0]}:{target[1]} "
        f"in {report.seconds:,.1f} s ({report.recording_seconds:,.1f} s recorded)"
    )


@udp_app.command("synth")
def udp_synth(
    output: Annotated[Path, typer.Argument(help="Recording to write.")],
    packet_format: Annotated[int, typer.Option("--format", help="2024 (F1 24) or 2025.")] = 2025,
    cars: Annotated[int, typer.Option(help="Cars in the session (1-22).")] = 22,
    laps: Annotated[int, typer.Option(help="Race laps.")] = 3,
    rate: Annotated[float, typer.Option(help="Frames per second (the game: up to 60).")] = 60.0,
    lap_seconds: Annotated[float, typer.Option(help="Typical lap time (s).")] = 80.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic game session (a race with a start, pit stops and an end)."""
    from tqdm import tqdm

    from pipeline.sources.udp_recording import write_recording
    from pipeline.sources.udp_synth import synthetic_session

    try:
        session = synthetic_session(
            fmt=packet_format, cars=cars, laps=laps, rate_hz=rate, lap_s=lap_seconds, seed=seed
        )
        with tqdm(unit=" datagrams", desc=output.name) as bar:
            count = write_recording(output, _counted(session, bar))
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"{count:,} datagrams written to {output}")


@udp_app.command("inspect")
def udp_inspect(
    recording: Annotated[Path, typer.Argument(help="A recording (f1-udp container format).")],
) -> None:
    """Datagrams of a recording per packet type, as the listener would count them."""
    from pipeline.sources.udp_packets import PacketParser
    from pipeline.sources.udp_recording import RecordingDamaged, read_recording

    parser = PacketParser()
    try:
        for _, datagram in read_recording(recording):
            parser.parse(datagram)
    except RecordingDamaged as err:
        _fail(str(err))
    for name, count in sorted(parser.counts.items()):
        typer.echo(f"  {name:<28} {count:,}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures, not pass/fail).")
app.add_typer(bench_app, name="bench")


@bench_app.command("replay")
def bench_replay(
    key: Annotated[str, typer.Option(help="Export to replay.")] = "2023_Monaco_R",
    speed: Annotated[float, typer.Option(help="Speed factor for the pacing run.")] = 1.0,
    seconds: Annotated[float, typer.Option(help="Length of the pacing run.")] = 10.0,
) -> None:
    """Replay throughput (unpaced) and pacing error (paced), with the machine."""
    import os
    import platform

    from pipeline.bench.replay_bench import run

    folder = get_settings().export_dir / key
    try:
        figures = run(folder, speed=speed, seconds=seconds)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for name, value in vars(figures).items():
        typer.echo(
            f"  {name:<26} {value:,.3f}" if isinstance(value, float) else f"  {name:<26} {value:,}"
        )


@bench_app.command("stream")
def bench_stream(
    session: Annotated[str, typer.Option(help="Export to stream.")] = "2023_Monaco_R",
    latency_seconds: Annotated[
        float, typer.Option(help="Session seconds replayed at 1x for the latency run; 0 skips.")
    ] = 120.0,
) -> None:
    """One consumer's end-to-end throughput vs Kafka's own perf test; latency at 1x."""
    import os
    import platform

    from pipeline.bench import stream_bench

    _setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    settings = get_settings()
    folder = _export_folder(session)
    typer.echo(f"machine: {platform.machine()}, {os.cpu_count()} cores; session {session}")
    figures = {"throughput": stream_bench.throughput(settings, folder)}
    if latency_seconds:
        figures["latency at 1x"] = stream_bench.latency_1x(settings, folder, latency_seconds)
    for title, values in figures.items():
        typer.echo(f"{title}:")
        for name, value in values.items():
            typer.echo(f"  {name:<32} {value:,.3f}" if isinstance(value, float)
                       else f"  {name:<32} {value:,}")  # fmt: skip


@bench_app.command("scaling")
def bench_scaling(
    session: Annotated[str, typer.Option(help="Export the streams replay.")] = "2023_Monaco_R",
    speed: Annotated[float, typer.Option(help="Pace of each stream (x real time).")] = 20.0,
    seconds: Annotated[float, typer.Option(help="Wall seconds each stream runs.")] = 60.0,
    counts: Annotated[str, typer.Option(help="Consumer counts, comma-separated.")] = "1,2,4",
    plot: Annotated[
        Path | None, typer.Option(help="Where the PNG plot goes [docs/img/scaling.png].")
    ] = None,
) -> None:
    """Weak and strong scaling over 1, 2, 4 consumer processes: throughput,
    produce-to-commit latency, lag, CPU; to PostgreSQL, MLflow and a plot."""
    from tqdm import tqdm

    from pipeline.bench import scaling

    _setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    settings = get_settings()
    plot = plot or scaling.PLOT
    ks = [int(k) for k in counts.split(",")]
    total = len(scaling.points(ks))
    with tqdm(total=total, desc="scaling points", unit="point") as bar:
        experiment, run_id = scaling.run_and_record(
            settings, _export_folder(session), counts=ks, speed=speed, seconds=seconds,
            plot_path=plot, on_point=lambda result: bar.update(1),
        )  # fmt: skip
    typer.echo(f"{experiment.experiment_id} on {experiment.host}, {experiment.cores} cores")
    typer.echo(scaling.table(experiment))
    typer.echo(f"plot: {plot}; MLflow run {run_id}; rows in bench_scaling")


@bench_app.command("live")
def bench_live(
    session: Annotated[str, typer.Option(help="Export to replay (from about lap 22).")] = (
        "2023_Monaco_R"
    ),
    seconds: Annotated[float, typer.Option(help="Wall seconds the page is watched.")] = 30.0,
    speed: Annotated[float, typer.Option(help="Replay speed (1 = real time).")] = 1.0,
    consumers: Annotated[int, typer.Option(help="Consumers in the group.")] = 2,
) -> None:
    """The live page in headless Chromium during a replay: updates and redraws per
    second, and the time from a consumer's commit to the browser having it."""
    import os
    import platform

    from pipeline.bench import live_bench

    _setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    settings = get_settings()
    live = live_bench.run(
        settings, _export_folder(session), seconds=seconds, speed=speed, consumers=consumers
    )
    typer.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {session} at {speed:g}x, "
        f"{consumers} consumer(s), {seconds:g} s watched"
    )
    for name, value in live_bench.figures(live).items():
        typer.echo(f"  {name:<28} {value:,.3f}" if isinstance(value, float)
                   else f"  {name:<28} {value:,}")  # fmt: skip


@bench_app.command("udp")
def bench_udp(
    seconds: Annotated[
        float, typer.Option(help="Session seconds of the 60 Hz live run; 0 skips it.")
    ] = 600.0,
) -> None:
    """The game feed: parse rate, then a 22-car 60 Hz session over loopback through
    the listener and one consumer (datagrams lost, receive-to-commit)."""
    import os
    import platform

    from pipeline.bench import udp_bench

    _setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    typer.echo(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    figures = {"parse": udp_bench.parse()}
    if seconds:
        figures["live 60 Hz, 22 cars"] = udp_bench.live(get_settings(), seconds)
    for title, values in figures.items():
        typer.echo(f"{title}:")
        for name, value in values.items():
            typer.echo(f"  {name:<50} {value:,.3f}" if isinstance(value, float)
                       else f"  {name:<50} {value}")  # fmt: skip


@bench_app.command("models")
def bench_models() -> None:
    """Inference cost of the latest model versions: single row and per row in a batch."""
    import os
    import platform

    from pipeline.bench import model_bench

    figures = model_bench.run(get_settings())
    if not figures:
        _fail("no registered models: run `f1 train` first")
    typer.echo(f"machine: {platform.machine()}, {os.cpu_count()} cores; one thread per call")
    for label, values in figures.items():
        typer.echo(f"{label}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        ))  # fmt: skip


@bench_app.command("all")
def bench_all(
    quick: Annotated[
        bool, typer.Option(help="Tiny loads: a smoke run of a few minutes, figures say little.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where the Markdown report goes [docs/benchmarks.md].")
    ] = None,
    only: Annotated[
        str,
        typer.Option(
            help="Sections, comma-separated (default all): producer, decode, consumer, cpu, "
            "speed, latency, models, sink, memory."
        ),
    ] = "",
) -> None:
    """The benchmark suite: each figure beside Kafka's own perf tools measured in
    the same run (ratios first), with the machine; to docs/benchmarks.md."""
    from tqdm import tqdm

    from pipeline.bench import suite

    _setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    sections = [s.strip() for s in only.split(",") if s.strip()] or list(suite.SECTIONS)
    unknown = [s for s in sections if s not in suite.SECTIONS]
    if unknown:
        _fail(f"unknown sections {unknown}; the sections are {', '.join(suite.SECTIONS)}")
    with tqdm(total=len(sections), desc="benchmarks", unit="section") as bar:
        report = suite.run(
            get_settings(), quick=quick, sections=sections,
            on_start=lambda key: bar.set_postfix_str(key),
            on_section=lambda section: bar.update(1),
        )  # fmt: skip
    path = suite.write(report, out or suite.DOCS)
    typer.echo(suite.summary_table(report))
    failed = [s for s in report.sections if s.error]
    for section in failed:
        typer.secho(f"{section.key} failed: {section.error}", fg=typer.colors.RED, err=True)
    typer.echo(f"report: {path} ({report.seconds / 60:.0f} min)")
    if failed:
        raise typer.Exit(1)


def _print_status(settings: Settings) -> bool:
    from pipeline.stack import manager

    rows = manager.status(settings)
    all_ok = True
    for name, pid, healthy, url in rows:
        state = "healthy" if healthy else ("UNHEALTHY" if pid else "stopped")
        all_ok &= healthy
        typer.echo(f"  {name:<22} {state:<10} {('pid ' + str(pid)) if pid else '':<10} {url}")
    return all_ok


def main() -> None:
    from pipeline.settings import SettingsError

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except SettingsError as err:  # one clear message, no traceback echoing values
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)
