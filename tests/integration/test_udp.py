"""The game's UDP feed through the whole pipeline: datagrams over a real UDP
socket to the listener, the real broker (scratch topics), a consumer process,
PostgreSQL. Every produced sample stored exactly once, windows equal a
recomputation from the stored samples, anomalies and predictions present; no
datagram however malformed stops the listener; `airflow dags test f1_udp_live`."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.dashboards import bundle
from pipeline.kafka.consumer import verify_run
from pipeline.kafka.udp_listener import ListenReport, UdpListener
from pipeline.ml import live_scores
from pipeline.ml.registry import scratch_models
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.sources import udp_packets
from pipeline.sources.udp_recording import read_recording, send_datagrams, write_recording
from pipeline.sources.udp_synth import synthetic_session
from pipeline.stack import airflow_server
from tests.integration.streams import (
    F1,
    assert_windows_match,
    consumer_process,
    register_toy_champion,
    wait_ok,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Running:
    """A listener in a thread of the test process (its socket is real)."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.address = ("127.0.0.1", _free_port())
        self.stop = threading.Event()
        self.listener = UdpListener(
            f"127.0.0.1:{self.address[1]}", settings=settings, stop=self.stop, **options
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.listener.ready.wait(30), "the listener did not bind"

    def _run(self) -> None:
        try:
            self.listener.run()
        except BaseException as err:  # re-raised in the test's thread
            self.error = err

    def wait_for(self, done: Callable[[ListenReport], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.listener.report) and time.monotonic() < deadline:
            assert self.error is None, self.error
            time.sleep(0.2)
        assert done(self.listener.report), self.listener.report

    def wait_for_runs(self, count: int) -> list[dict[str, Any]]:
        self.wait_for(lambda report: len(report.runs) >= count)
        return self.listener.report.runs

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert self.error is None, self.error


@pytest.fixture
def listening(isolated: tuple[Settings, dict[str, str]]) -> Iterator[Running]:
    running = Running(isolated[0])
    try:
        yield running
    finally:
        running.stop.set()
        running.thread.join(60)


def _stored(settings: Settings, run: str) -> pd.DataFrame:
    with telemetry_db.connect(settings) as conn:
        cur = conn.execute(
            "SELECT driver_number, seq, (extract(epoch FROM event_time) * 1e9)::bigint AS date,"
            " speed, rpm, gear, throttle, brake, drs_open, compound, lap_number"
            " FROM telemetry_samples WHERE run_id = %s",
            (run,),
        )
        return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description or []])


def _check_run(settings: Settings, env: dict[str, str], run: dict[str, Any]) -> pd.DataFrame:
    """Consume the run to its end markers; verify; windows against the samples."""
    consumer = consumer_process(env, "udp-consumer", run["run_id"])
    wait_ok(consumer)
    summary = verify_run(run["run_id"], delivered=run["delivered"], settings=settings)
    assert summary["stored"] == run["delivered"] > 0
    stored = _stored(settings, run["run_id"])
    # The windows recomputed from the stored samples (the pandas recomputation
    # of the replay tests reads FastF1's columns: brake on/off, DRS codes).
    frame = stored.assign(
        date=pd.to_datetime(stored["date"]), brake=stored["brake"] >= 50,
        drs=np.where(stored["drs_open"], 10, 0),
    )  # fmt: skip
    assert_windows_match(settings, run["run_id"], frame)
    return stored


def test_the_real_recording_over_udp_is_stored_exactly_once(
    isolated: tuple[Settings, dict[str, str]], listening: Running
) -> None:
    settings, env = isolated
    sent = send_datagrams(read_recording(settings.udp_recording), listening.address, speed=None)
    listening.wait_for(lambda report: report.received >= sent.sent)
    listening.close()  # the recording stops before the game's SEND: stopping ends the run
    report = listening.listener.report
    [run] = report.runs
    assert report.received == sent.sent == 526
    assert report.datagrams["parsed:CarTelemetry"] == 57
    assert run["ended"] == "the listener stopped"
    stored = _check_run(settings, env, run)
    assert len(stored) == 57 and set(stored["driver_number"]) == {5}
    assert sorted(stored["seq"]) == list(range(57))
    assert stored["speed"].max() == 346
    with telemetry_db.connect(settings) as conn:
        source, planned = conn.execute(
            "SELECT source, samples_planned FROM stream_runs WHERE run_id = %s", (run["run_id"],)
        ).fetchone() or (None, None)
    assert (source, planned) == ("f1-udp", 57)


def test_a_synthetic_f1_25_race_has_windows_anomalies_and_predictions(
    isolated: tuple[Settings, dict[str, str]], listening: Running
) -> None:
    settings, env = isolated
    datagrams = []
    impossible = None  # one CarTelemetry packet gets an rpm no power unit reaches
    for t, datagram in synthetic_session(fmt=2025, cars=22, laps=2, rate_hz=10, lap_s=25):
        if datagram[6] == udp_packets.CAR_TELEMETRY and t > 20 and impossible is None:
            packet = np.frombuffer(datagram, udp_packets.PACKETS[(2025, 6)]).copy()
            packet["cars"]["engine_rpm"][0, 3] = 20_000
            datagram, impossible = packet.tobytes(), t
        datagrams.append((t, datagram))
    send_datagrams(datagrams, listening.address, speed=4.0)
    [run] = listening.wait_for_runs(1)
    listening.close()
    # A champion of its own, so the test does not depend on the demo's models.
    with scratch_models(settings, "udp") as models:
        register_toy_champion(models)
        served = {**env, "MODEL_NAME_PREFIX": models.model_name_prefix}
        stored = _check_run(settings, served, run)
        # Scored live as a game session is: outcomes from the stream (pit stops only).
        scores = live_scores.score_run(run["run_id"], models)
    assert {(s["label"], s["role"], s["outcomes_from"]) for s in scores} == {
        ("pit_stop", "champion", "stream")
    }
    assert (
        stored.groupby("driver_number").size().nunique() == 1
        and stored["driver_number"].nunique() == 22
    )
    assert set(stored["compound"].dropna()) >= {"SOFT", "MEDIUM"}
    with telemetry_db.connect(settings) as conn:
        reasons = conn.execute(
            "SELECT DISTINCT unnest(anomalies) FROM telemetry_samples WHERE run_id = %s",
            (run["run_id"],),
        ).fetchall()
        scored = conn.execute(
            "SELECT count(*), count(pit_stop_p) FROM telemetry_predictions WHERE run_id = %s",
            (run["run_id"],),
        ).fetchone()
    assert ("impossible_rpm",) in reasons
    assert scored is not None and scored[0] == len(stored) and scored[1] > 0
    # The dashboards read the tables: every chart of a session has rows for the game's.
    bundle.import_bundle(settings)  # idempotent: the test does not rely on an earlier import
    with bundle.api_client(settings) as client:
        rows = {
            chart: bundle.chart_data(client, settings, chart, run["session_key"])
            for chart in bundle.session_chart_uuids()
        }
    empty = [r["slice_name"] for r in rows.values() if r["rowcount"] == 0]
    assert not empty, f"charts with no rows for {run['session_key']}: {empty}"


def test_the_listener_hears_only_this_machine_by_default() -> None:
    assert UdpListener(settings=Settings()).bind_to == ("127.0.0.1", 20777)


def test_no_datagram_stops_the_listener(
    isolated: tuple[Settings, dict[str, str]], listening: Running
) -> None:
    settings, env = isolated
    rng = np.random.default_rng(5)
    header = udp_packets.header  # the real layout, to build near-valid datagrams
    valid = next(d for _, d in read_recording(settings.udp_recording) if d[6] == 6)
    junk: list[bytes] = [rng.bytes(int(n)) for n in rng.integers(0, 1500, 300)]
    junk += [valid[: int(n)] for n in rng.integers(0, len(valid), 100)]  # truncated
    junk += [valid + b"\x00" * 9] * 50  # wrong size
    junk += [b"\xe7\x07" + valid[2:]] * 50  # packet format 2023
    junk += [valid[:6] + bytes([200]) + valid[7:]] * 2_000  # a flood of unknown ids
    assert header(valid)["packet_id"] == 6
    send_datagrams(((0.0, d) for d in junk), listening.address, speed=None)
    # ... and the feed still works afterwards.
    send_datagrams(read_recording(settings.udp_recording), listening.address, speed=None)
    listening.wait_for(lambda report: report.received >= len(junk) + 526)
    listening.close()
    [run] = listening.listener.report.runs
    counts = listening.listener.report.datagrams
    assert listening.listener.report.received == len(junk) + 526
    assert counts["unknown_id"] >= 2_000 and counts["unknown_format"] >= 50
    assert counts["wrong_size:CarTelemetry"] >= 50 and counts["too_short"] >= 1
    assert sum(counts.values()) == len(junk) + 526
    _check_run(settings, env, run)


def test_forwarding_sends_every_datagram_on_unchanged(
    isolated: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, _ = isolated
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    forward = f"127.0.0.1:{receiver.getsockname()[1]}"
    running = Running(settings, forward=[forward, "127.0.0.1:9"], record=tmp_path / "copy.bin")
    try:
        datagrams = [d for _, d in read_recording(settings.udp_recording)][:100]
        send_datagrams(((0.0, d) for d in datagrams), running.address, speed=None)
        received = [receiver.recv(65_535) for _ in datagrams]
    finally:
        running.close()
        receiver.close()
    assert received == datagrams
    assert [d for _, d in read_recording(tmp_path / "copy.bin")] == datagrams
    report = running.listener.report
    assert report.forwarded + report.forward_errors == 2 * len(datagrams)


def test_udp_live_dag_runs_under_airflow_dags_test(
    isolated: tuple[Settings, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, env = isolated
    for key in ("TELEMETRY_TOPIC", "DEAD_LETTER_TOPIC", "CONSUMER_GROUP"):
        monkeypatch.setenv(key, env[key])
    recording = tmp_path / "synthetic.bin"
    write_recording(recording, synthetic_session(fmt=2025, cars=22, laps=1, rate_hz=10, lap_s=20))
    recording.chmod(0o644)
    tmp_path.chmod(0o755)
    conf = json.dumps({
        "address": f"127.0.0.1:{_free_port()}", "duration_s": 600, "replay": str(recording),
        "replay_speed": 4,
    })  # fmt: skip
    result = airflow_server.dags_test(settings, "f1_udp_live", "--conf", conf)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "state=success" in result.stdout + result.stderr
    with telemetry_db.connect(settings) as conn:
        runs = conn.execute(
            "SELECT r.run_id, r.samples_delivered, count(s.*) FROM stream_runs r "
            "JOIN telemetry_samples s USING (run_id) WHERE r.topic = %s AND r.source = 'f1-udp' "
            "GROUP BY 1, 2",
            (settings.telemetry_topic,),
        ).fetchall()
    assert len(runs) == 1 and runs[0][1] == runs[0][2] > 0, runs


def _bound(port: int) -> bool:
    """Whether something listens on the UDP port (our own bind is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_cli_writes_replays_listens_and_reports(
    isolated: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, env = isolated
    recording, report_file = tmp_path / "race.bin", tmp_path / "report.json"
    synth = subprocess.run(
        [F1, "udp", "synth", str(recording), "--format", "2024", "--cars", "3", "--laps", "1",
         "--rate", "10", "--lap-seconds", "20"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    written = int(synth.stdout.split()[0].replace(",", ""))
    inspect = subprocess.run([F1, "udp", "inspect", str(recording)], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "parsed:CarTelemetry" in inspect and "ignored:Motion" in inspect
    port = _free_port()
    listener = subprocess.Popen(
        [F1, "udp", "listen", "--address", f"127.0.0.1:{port}", "--report-json", str(report_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _bound(port) and listener.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run([F1, "udp", "replay", str(recording), "--address", f"127.0.0.1:{port}",
                        "--speed", "0"], env=env, check=True, capture_output=True)  # fmt: skip
        # The synthetic session ends with SEND: wait for the listener to end its run.
        with telemetry_db.connect(settings) as conn:
            while (
                time.monotonic() < deadline + 120
                and not conn.execute(
                    "SELECT 1 FROM stream_runs WHERE topic = %s AND finished_at IS NOT NULL",
                    (settings.telemetry_topic,),
                ).fetchone()
            ):
                time.sleep(0.2)
    finally:
        listener.terminate()  # SIGTERM: ends open runs, flushes, reports
        output, _ = listener.communicate(timeout=60)
    assert listener.returncode == 0, output[-3000:]
    report = json.loads(report_file.read_text())
    assert report["received"] == written and report["stop_reason"] == "stop requested"
    [run] = report["runs"]
    assert run["ended"] == "the game ended the session (SEND)"
    assert run["delivered"] == report["samples_produced"] > 0
    assert f"run {run['run_id']}" in output
