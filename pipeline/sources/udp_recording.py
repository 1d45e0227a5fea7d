"""UDP recordings: the container format of ../shared/data/f1-udp, and replaying
one to a UDP address at its original pace, faster, or unpaced.

The format (little-endian): `uint32 N`, then N times `float32 t` (seconds since
the recording started, receive time), `uint32 L`, `L` bytes of datagram exactly
as the game sent it. A recording being written holds N = 0 until it is closed
(the count is patched in then), so one cut short by a crash still reads: the
reader trusts the records, and says when N disagrees.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")
_RECORD = struct.Struct("<fI")
MAX_DATAGRAM = 65_507  # the largest UDP payload over IPv4


class RecordingDamaged(ValueError):
    """A recording that is not in the container format."""


def read_recording(path: Path) -> Iterator[tuple[float, bytes]]:
    """Yield (t, datagram) of a recording in order."""
    with open(path, "rb") as file:
        head = file.read(_COUNT.size)
        if len(head) < _COUNT.size:
            raise RecordingDamaged(f"{path} is empty or not a UDP recording (no datagram count)")
        (announced,) = _COUNT.unpack(head)
        seen = 0
        while True:
            record = file.read(_RECORD.size)
            if not record:
                break
            if len(record) < _RECORD.size:
                raise RecordingDamaged(f"{path}: record {seen + 1} is cut short (truncated file)")
            t, length = _RECORD.unpack(record)
            if length > MAX_DATAGRAM:
                raise RecordingDamaged(
                    f"{path}: record {seen + 1} claims {length} bytes, more than a UDP datagram "
                    "holds; this is not a recording in the f1-udp container format"
                )
            datagram = file.read(length)
            if len(datagram) < length:
                raise RecordingDamaged(f"{path}: record {seen + 1} is cut short (truncated file)")
            seen += 1
            yield t, datagram
        if announced not in (0, seen):
            log.warning("%s announces %d datagrams but holds %d", path, announced, seen)


class RecordingWriter:
    """Write a recording; `t` is given by the caller (receive time since start)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(_COUNT.pack(0))
        self.count = 0

    def write(self, t: float, datagram: bytes) -> None:
        self._file.write(_RECORD.pack(t, len(datagram)))
        self._file.write(datagram)
        self.count += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_COUNT.pack(self.count))
        self._file.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_recording(path: Path, datagrams: Iterable[tuple[float, bytes]]) -> int:
    """Write (t, datagram) pairs as a recording; returns how many."""
    with RecordingWriter(path) as writer:
        for t, datagram in datagrams:
            writer.write(t, datagram)
        return writer.count


def record(
    path: Path,
    address: tuple[str, int],
    *,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Receive datagrams on `address` and write them, unchanged, until `stop`
    or `duration_s`; returns how many were recorded."""
    stop = stop or threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, RecordingWriter(path) as out:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind(address)
        sock.settimeout(0.2)
        started = time.monotonic()
        while not stop.is_set():
            if duration_s is not None and time.monotonic() - started >= duration_s:
                break
            try:
                datagram = sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                continue
            out.write(time.monotonic() - started, datagram)
        return out.count


def datagram_source(spec: str) -> Iterator[tuple[float, bytes]]:
    """`synthetic:2024` / `synthetic:2025` (a 22-car, 60 Hz, 3-lap synthetic
    race) or the path of a recording."""
    kind, _, fmt = spec.partition(":")
    if kind == "synthetic":
        from pipeline.sources.udp_synth import synthetic_session

        if not fmt.isdigit():
            raise ValueError(f"{spec!r}: say which format, synthetic:2024 or synthetic:2025")
        return synthetic_session(fmt=int(fmt))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no recording at {path} (or say synthetic:2024 / synthetic:2025)")
    return read_recording(path)


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` as a socket address; a clear error otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise ValueError(f"{text!r} is not an address HOST:PORT (for example 127.0.0.1:20777)")
    return host.strip("[]"), int(port)


@dataclass
class ReplayReport:
    sent: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    recording_seconds: float = 0.0
    max_lateness_s: float = 0.0


def send_datagrams(
    datagrams: Iterable[tuple[float, bytes]],
    address: tuple[str, int],
    *,
    speed: float | None = 1.0,
) -> ReplayReport:
    """Send (t, datagram) pairs to `address` on their own clock divided by
    `speed` (None: as fast as the socket takes them)."""
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be positive (got {speed}); 0 on the CLI sends unpaced")
    report = ReplayReport()
    started = time.perf_counter()
    first: float | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for t, datagram in datagrams:
            first = t if first is None else first
            if speed is not None:
                due = started + (t - first) / speed
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                else:
                    report.max_lateness_s = max(report.max_lateness_s, -wait)
            sock.sendto(datagram, address)
            report.sent += 1
            report.bytes_sent += len(datagram)
            report.recording_seconds = t - first
    report.seconds = time.perf_counter() - started
    return report
