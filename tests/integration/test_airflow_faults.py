"""The Airflow stream task killed: retried, and never two live consumers doing the
same work.

The shared Airflow is busy with the demo (f1_stream has max_active_runs=1) and
must be left alone, so this runs f1_stream in an Airflow of its own: a private
PostgreSQL (Airflow's metadata and the telemetry rows) and a private Airflow
whose tasks use scratch topics and a scratch group on the shared broker
(pipeline/stack/sandbox.py). One `consume` task's process is SIGKILLed while it
commits batches; Airflow must retry it and the run must succeed, `verify`
included, with nothing lost or doubled (tests/integration/faults.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pandas as pd
import psutil
import pytest

from pipeline.kafka.topics import scratch_topics
from pipeline.settings import Settings
from pipeline.sinks import telemetry_db
from pipeline.stack import airflow_server
from pipeline.stack.sandbox import PrivateServices, private_services
from tests.integration.faults import FaultRow, in_flight, measure
from tests.integration.streams import RACE

pytestmark = pytest.mark.faults
log = logging.getLogger(__name__)

DAG = "f1_stream"
# 600 s of session time at 10x: about a minute of producing (~47,000 samples), so
# the killed consumer's retry joins while the producer is still sending.
CONF = {"session": RACE, "speed": 10, "duration_s": 600, "consumers": 2, "idle_timeout_s": 60}
RUNNER = "airflow worker -- "  # a task process's title: the task instance's id follows


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _slice(race: pd.DataFrame, seconds: float) -> pd.DataFrame:
    """What produce_session replays with start_offset_s=0 and duration_s=seconds."""
    first = race["session_time_s"].iloc[0]
    return race[race["session_time_s"] < first + seconds]


def _wait(what: str, check: Any, timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:g} s"
        time.sleep(every_s)
    return value


class Runners:
    """Samples, every 0.25 s, the task processes the private scheduler runs (pid
    and task instance id), to show afterwards that no two ever ran the same work."""

    def __init__(self, scheduler_pid: int) -> None:
        self.scheduler = psutil.Process(scheduler_pid)
        self.samples: list[tuple[float, frozenset[tuple[int, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> frozenset[tuple[int, str]]:
        found = set()
        for child in self.scheduler.children(recursive=True):
            try:
                title = " ".join(child.cmdline())
                runs = title.startswith(RUNNER) and "LocalExecutor" not in title
                if runs and child.status() != psutil.STATUS_ZOMBIE:
                    found.add((child.pid, title.removeprefix(RUNNER).strip()))
            except psutil.NoSuchProcess:
                continue
        return frozenset(found)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.now()))
            except psutil.NoSuchProcess:  # the scheduler stopped
                return
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _gone(pid: int) -> bool:
    """Not running (a zombie this process started and has not reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _metrics(settings: Settings) -> pd.DataFrame:
    """Every batch of messages the scratch group committed: who, which partitions
    it owned, and when it worked on it."""
    with telemetry_db.connect(settings) as conn:
        cur = conn.execute(
            "SELECT consumer, partitions, recorded_at, batch_seconds FROM stream_metrics "
            "WHERE group_id = %s AND messages > 0 ORDER BY recorded_at",
            (settings.consumer_group,),
        )
        return pd.DataFrame(cur.fetchall(), columns=["consumer", "partitions", "end", "seconds"])


def _epochs(settings: Settings) -> dict[int, int]:
    with telemetry_db.connect(settings) as conn:
        return dict(
            conn.execute(
                "SELECT topic_partition, epoch FROM consumer_offsets "
                "WHERE group_id = %s AND topic = %s",
                (settings.consumer_group, settings.telemetry_topic),
            ).fetchall()
        )


def _overlaps(batches: pd.DataFrame) -> list[str]:
    """Batches of two different consumers on one partition at the same time.

    A batch's span is [recorded_at - batch_seconds, recorded_at]: recorded_at is
    when its rows were written, just before its COMMIT, and batch_seconds how long
    the consumer had then handled it, from decoding on. So the span is when the
    consumer worked on the batch (its COMMIT a moment later): both consumers were
    busy with their batches during an overlap found here (a tiny one may be
    missed, none is invented). `partitions` is what the
    consumer owned then; it cannot change within a batch (rebalances are served
    only while polling, between batches)."""
    spans = sorted(
        (p, row.end - dt.timedelta(seconds=float(row.seconds)), row.end, row.consumer)
        for row in batches.itertuples()
        for p in row.partitions
    )
    found = []
    latest: dict[tuple[int, str], dt.datetime] = {}  # (partition, consumer) -> its last end
    for p, start, end, who in spans:  # by partition, then start
        for (q, other), other_end in latest.items():
            if q == p and other != who and other_end > start:
                found.append(f"partition {p}: {who} from {start}, {other} until {other_end}")
        latest[(p, who)] = max(end, latest.get((p, who), end))
    return found


def _task_logs(private: PrivateServices, run_id: str) -> str:
    """The tails of the run's task logs (for a failure's message)."""
    folder = private.settings.log_dir / "airflow" / f"dag_id={DAG}" / f"run_id={run_id}"
    parts = []
    for path in sorted(folder.rglob("*.log")) if folder.exists() else []:
        lines = path.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {path.relative_to(folder)}\n" + "\n".join(lines))
    return "\n".join(parts) or f"(no task logs under {folder})"


@pytest.mark.faults_long
def test_the_airflow_consume_task_killed_is_retried_and_never_two_consumers_share_work(
    stack: Settings, race: pd.DataFrame, fault_table: list[FaultRow]
) -> None:
    # Scratch topics first: the private Airflow's tasks are started with them.
    with (
        scratch_topics(stack, "fault-airflow") as scratch,
        private_services(scratch, only={"postgres", "airflow"}) as private,
        airflow_server.api_client(private.settings) as api,
    ):
        settings = private.settings
        telemetry_db.ensure_schema(settings)
        components = {p.name: p.pid() for p in private.processes("airflow")}
        scheduler_pid = components["airflow-scheduler"]
        assert None not in components.values(), components
        _wait(
            "the private Airflow parsing f1_stream",
            lambda: api.get(f"/dags/{DAG}").is_success,
            180,
            2,
        )
        api.patch(f"/dags/{DAG}", json={"is_paused": False}).raise_for_status()
        answer = api.post(f"/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": CONF})
        answer.raise_for_status()
        run_id = answer.json()["dag_run_id"]
        runners = Runners(scheduler_pid)
        try:
            figures = _kill_a_consumer_and_wait(api, settings, run_id, runners)
        except BaseException:
            print(_task_logs(private, run_id))
            raise
        finally:
            runners.stop()
        tries = _tries(api, run_id)
        lost, doubled = measure(settings, f"{RACE}@{run_id}", _slice(race, CONF["duration_s"]))
        batches = _metrics(settings)
        epochs = _epochs(settings)
    victim, killed_at, flying, recovery, retry_after = figures
    # The private Airflow and PostgreSQL are gone, their folder too (the shared
    # Airflow never saw this run: the `stack` fixture checks it was left alone).
    assert not settings.stack_dir.exists()
    assert all(_gone(pid) for pid in components.values() if pid)

    # Retried: the killed try failed, a later one of the same task succeeded.
    consume = tries[("consume", victim["map_index"])]
    assert victim["try_number"] in consume and consume[victim["try_number"]]["state"] != "success"
    final = max(consume)
    assert final >= 2 and consume[final]["state"] == "success", consume

    # Never two live consumers doing the same work, checked two ways:
    # 1. The processes: at no sample did two tries of one task run at once (the
    #    killed one was gone before its retry started), nor more consumers than
    #    the DAG maps. Airflow gives each try its own id and process, so this is
    #    what Airflow's retry itself guarantees, seen from outside.
    by_pid = {t["pid"]: key for key, per_try in tries.items() for t in per_try.values() if t["pid"]}
    for _, live in runners.samples:
        running = [by_pid[pid] for pid, _ in live if pid in by_pid]
        assert len(running) == len(set(running)), f"two tries of one task at once: {running}"
        assert sum(task == "consume" for task, _ in running) <= CONF["consumers"]
    assert any(victim["pid"] in {pid for pid, _ in live} for _, live in runners.samples)
    # 2. The work: no partition had batches of two consumers at the same time
    #    (stream_metrics), and the killed consumer's partitions were claimed again
    #    after the kill (their epoch moved on), so even a try that had somehow
    #    survived would have been fenced off them. What cannot be checked from the
    #    rows: which try wrote a batch (a retry keeps its member name), so the
    #    killed try and its retry are told apart by the process samples above.
    assert not _overlaps(batches), _overlaps(batches)
    owned = victim["partitions"]
    assert owned and all(epochs[p] > victim["epochs"][p] for p in owned), (owned, epochs)
    after = batches[batches["end"] > killed_at]
    assert set(after["consumer"]) <= set(victim["members"])

    log.info(
        "killed %s (pid %s, partitions %s) at %s; consume tries %s; epochs %s -> %s; "
        "%d batches, %d after the kill by %s; %d process samples",
        victim["id"], victim["pid"], owned, killed_at,
        {k: {n: t["state"] for n, t in v.items()} for k, v in tries.items() if k[0] == "consume"},
        victim["epochs"], epochs, len(batches), len(after),
        dict(Counter(after["consumer"])), len(runners.samples),
    )  # fmt: skip
    fault_table.append(
        FaultRow("Airflow consume task SIGKILL",
                 f"a private Airflow's f1_stream: SIGKILL to one consume task's process "
                 f"(try {victim['try_number']}) mid-stream; retried {retry_after:.0f} s later, "
                 "the run and its verify succeeded", flying, lost, doubled, recovery)
    )  # fmt: skip


def _task_instances(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    answer = api.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances")
    answer.raise_for_status()
    return list(answer.json()["task_instances"])


def _tries(api: httpx.Client, run_id: str) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    """(task, map index) -> try number -> that try (state, pid, ...)."""
    tries: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for ti in _task_instances(api, run_id):
        task, index = ti["task_id"], ti["map_index"]
        path = f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task}"
        answer = api.get(f"{path}/{index}/tries" if index >= 0 else f"{path}/tries")
        answer.raise_for_status()
        per_try = {t["try_number"]: t for t in answer.json()["task_instances"]}
        per_try[ti["try_number"]] = ti
        tries[(task, index)] = per_try
    return tries


def _kill_a_consumer_and_wait(
    api: httpx.Client, settings: Settings, run_id: str, runners: Runners
) -> tuple[dict[str, Any], dt.datetime, int, float, float]:
    members = [f"{run_id}-consumer-{i + 1}" for i in range(CONF["consumers"])]
    target = members[0]  # map index 0

    def running_and_committing() -> dict[str, Any] | None:
        ti = next(
            (t for t in _task_instances(api, run_id)
             if t["task_id"] == "consume" and t["map_index"] == 0),
            None,
        )  # fmt: skip
        if ti is None or ti["state"] != "running":
            return None
        batches = _metrics(settings)
        mine = batches[batches["consumer"] == target]
        return {**ti, "batches": len(mine)} if len(mine) >= 3 else None

    victim = _wait("consume[0] running with 3 batches committed", running_and_committing, 300)
    # The process that runs the consumer loop: the task runner (titled with the
    # task instance's id), a child of the executor's supervisor under the private
    # scheduler; not the supervisor, not the scheduler.
    runner = [pid for pid, ti_id in runners.now() if ti_id == victim["id"]]
    assert runner == [victim["pid"]], (runner, victim["pid"])
    process = psutil.Process(victim["pid"])
    assert runners.scheduler.pid in {p.pid for p in process.parents()}
    last = _metrics(settings)
    partitions = sorted(last[last["consumer"] == target].iloc[-1]["partitions"])
    epochs_before = _epochs(settings)
    flying = in_flight(settings)
    os.kill(process.pid, signal.SIGKILL)
    killed_at = _now()
    process.wait(30)  # gone (reaped by its supervisor)

    # Recovered: the killed consumer's partitions commit a batch again (whoever has them).
    def resumed() -> float | None:
        batches = _metrics(settings)
        later = batches[batches["end"] > killed_at]
        hit = later[[bool(set(p) & set(partitions)) for p in later["partitions"]]]
        return float((hit["end"].iloc[0] - killed_at).total_seconds()) if len(hit) else None

    recovery = _wait("a batch on the killed consumer's partitions", resumed, 300, 0.2)

    def retried() -> dict[str, Any] | None:
        ti = next(t for t in _task_instances(api, run_id)
                  if t["task_id"] == "consume" and t["map_index"] == 0)  # fmt: skip
        return ti if ti["try_number"] > victim["try_number"] and ti["start_date"] else None

    retry = _wait("consume[0] retried", retried, 180)
    retry_after = (dt.datetime.fromisoformat(retry["start_date"]) - killed_at).total_seconds()

    def finished() -> dict[str, Any] | None:
        answer = api.get(f"/dags/{DAG}/dagRuns/{run_id}")
        answer.raise_for_status()
        run = answer.json()
        return run if run["state"] in ("success", "failed") else None

    run = _wait("the DAG run finishing", finished, 900, 2)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in _task_instances(api, run_id)}
    assert run["state"] == "success", states
    victim |= {"partitions": partitions, "epochs": epochs_before, "members": members}
    return victim, killed_at, flying, recovery, retry_after
