"""What the fault tests measure, and the table they leave in docs/reliability.md.

"Nothing lost" is measured as Kafka's own system tests do, from the producer's
side: every sample the producer got a successful delivery report for must be in
PostgreSQL exactly once, and every window must equal a recomputation from the
delivered data. Each fault test adds its row (how the fault was injected, the
messages in flight when it struck, lost, doubled, time to recover); the table is
rewritten after the run, keeping the rows of faults that did not run this time.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from confluent_kafka import Consumer, TopicPartition

from pipeline.kafka.client import base_config
from pipeline.kafka.producer import ProduceReport
from pipeline.settings import PROJECT_ROOT, Settings
from pipeline.sinks import telemetry_db
from tests.integration.streams import assert_exactly_once, assert_windows_match, stored_samples

RELIABILITY_DOC = PROJECT_ROOT / "docs" / "reliability.md"
TABLE_START, TABLE_END = "<!-- fault table: start -->", "<!-- fault table: end -->"
COLUMNS = ("fault", "how it was injected", "in flight", "lost", "doubled", "recovered in")


@dataclass
class FaultRow:
    fault: str
    injected: str
    in_flight: int
    lost: int
    doubled: int
    recovery_s: float | None

    def cells(self) -> tuple[str, ...]:
        recovered = "-" if self.recovery_s is None else f"{self.recovery_s:.1f} s"
        return (self.fault, self.injected, f"{self.in_flight:,}", f"{self.lost:,}",
                f"{self.doubled:,}", recovered)  # fmt: skip


def in_flight(settings: Settings) -> int:
    """Messages on the topic that the group has not committed yet: the log end
    offsets from the broker minus the offsets stored with the rows."""
    reader = Consumer({**base_config(settings), "group.id": f"{settings.consumer_group}-probe"})
    try:
        partitions = reader.list_topics(settings.telemetry_topic, timeout=10)
        ends = {
            p: reader.get_watermark_offsets(TopicPartition(settings.telemetry_topic, p), 10)[1]
            for p in partitions.topics[settings.telemetry_topic].partitions
        }
    finally:
        reader.close()
    with telemetry_db.connect(settings) as conn:
        committed = dict(
            conn.execute(
                "SELECT topic_partition, coalesce(next_offset, 0) FROM consumer_offsets "
                "WHERE group_id = %s AND topic = %s",
                (settings.consumer_group, settings.telemetry_topic),
            ).fetchall()
        )
    return sum(end - committed.get(p, 0) for p, end in ends.items())


def wait_for_row(
    settings: Settings,
    query: str,
    params: tuple[Any, ...],
    done: Callable[[tuple[Any, ...]], bool],
    *,
    timeout_s: float = 180,
) -> tuple[Any, ...]:
    """Run `query` (one row) until `done(row)`; the row. Fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with telemetry_db.connect(settings, autocommit=True) as conn:
        while True:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
            if row is not None and done(row):
                return tuple(row)
            assert time.monotonic() < deadline, f"{query} {params}: {row} after {timeout_s:g} s"
            time.sleep(0.2)


def first_commit_after(settings: Settings, moment: dt.datetime, timeout_s: float = 300) -> float:
    """Seconds from `moment` to the group's first batch of messages committed
    after it (waits for one)."""
    (first,) = wait_for_row(
        settings,
        "SELECT min(recorded_at) FROM stream_metrics "
        "WHERE group_id = %s AND recorded_at > %s AND messages > 0",
        (settings.consumer_group, moment),
        lambda row: row[0] is not None,
        timeout_s=timeout_s,
    )
    return float((first - moment).total_seconds())


def wait_stored(settings: Settings, run: str, at_least: int, timeout_s: float = 180) -> int:
    """Wait until `at_least` samples of `run` are stored; returns how many are."""
    deadline = time.monotonic() + timeout_s
    while (count := len(stored_samples(settings, run))) < at_least:
        assert time.monotonic() < deadline, f"only {count} of {at_least} samples stored"
        time.sleep(0.2)
    return count


def delivered(report: ProduceReport, planned: pd.DataFrame) -> pd.DataFrame:
    """The planned samples whose delivery the producer saw acknowledged."""
    failed = pd.MultiIndex.from_tuples(report.failed_samples, names=["driver_number", "seq"])
    keys = pd.MultiIndex.from_frame(planned[["driver_number", "seq"]])
    return planned[~keys.isin(failed)]


def lost_and_doubled(settings: Settings, run: str, expected: pd.DataFrame) -> tuple[int, int]:
    """Delivered samples not stored; stored rows beyond one per delivered sample."""
    rows = stored_samples(settings, run)
    keys = set(zip(rows["driver_number"], rows["seq"], strict=True))
    wanted = set(zip(expected["driver_number"], expected["seq"], strict=True))
    return len(wanted - keys), len(rows) - len(keys) + len(keys - wanted)


def measure(settings: Settings, run: str, expected: pd.DataFrame) -> tuple[int, int]:
    """(lost, doubled), then the two checks that make them 0: every delivered
    sample stored exactly once, every window equal to the recomputation."""
    lost, doubled = lost_and_doubled(settings, run, expected)
    assert_exactly_once(settings, run, expected)
    assert_windows_match(settings, run, expected)
    return lost, doubled


class RegistryLink:
    """An HTTP hop between consumers and the real MLflow server that the test can
    cut (MLflow down, as the consumer sees it) and restore. It forwards each
    request as it came, with the Host header MLflow allows (MLflow refuses other
    Host headers, so a plain TCP relay would not do)."""

    def __init__(self, settings: Settings) -> None:
        from pipeline.stack.sandbox import free_port

        self.target = settings.mlflow_tracking_uri
        self.port = free_port(settings.bind_host)
        self.host = settings.bind_host
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        link = self

        class Forward(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                link.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                answer = httpx.request(
                    self.command, link.target + self.path, headers=headers,
                    content=self.rfile.read(length) if length else None, timeout=60,
                )  # fmt: skip
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("transfer-encoding", "content-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Forward)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Nothing listens on the port any more: connections are refused."""
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def close(self) -> None:
        if self._server is not None:
            self.down()


def _render(rows: dict[str, tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in sorted(rows.items())]
    return "\n".join(lines)


def _parse(text: str) -> dict[str, tuple[str, ...]]:
    if TABLE_START not in text:
        return {}
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = tuple(c.strip() for c in line.strip().strip("|").split("|"))
        if len(cells) == len(COLUMNS):
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="session")
def fault_table() -> Iterator[list[FaultRow]]:
    """Rows the fault tests add; merged into docs/reliability.md at the end."""
    rows: list[FaultRow] = []
    yield rows
    if not rows:
        return
    text = RELIABILITY_DOC.read_text() if RELIABILITY_DOC.exists() else ""
    table = _parse(text) | {row.fault: row.cells() for row in rows}
    stamp = (
        f"Last measured {dt.date.today().isoformat()} on a {os.cpu_count()}-core machine "
        "by `make test` (quick faults) or `make test-faults` (all)."
    )
    block = f"{TABLE_START}\n{_render(table)}\n\n{stamp}\n{TABLE_END}"
    if TABLE_START in text:
        text = re.sub(
            re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block, text,
            flags=re.S,
        )  # fmt: skip
    else:
        text = text + ("\n" if text else "") + block + "\n"
    Path(RELIABILITY_DOC).write_text(text)
