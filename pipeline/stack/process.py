"""One managed process: started in its own session (process group), logged to a
file, recorded in a pid file, proved ready by a health check, stopped by
signalling its whole group."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

HealthCheck = Callable[[], bool]


class StackError(RuntimeError):
    """A problem the user must act on; the message says what is wrong and what to do."""


def port_owner(host: str, port: int) -> str | None:
    """Who listens on host:port ("pid 123 (java ...)"), or None if the port is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) != 0:
            return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    break
                cmd = " ".join(psutil.Process(conn.pid).cmdline())[:80]
                return f"pid {conn.pid} ({cmd})"
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return "another process"


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log yet)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """A long-running service process of the local stack."""

    name: str
    argv: Sequence[str]
    run_dir: Path
    log_file: Path
    health: HealthCheck
    ports: Sequence[tuple[str, int]] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    start_timeout: float = 120.0
    stop_timeout: float = 60.0
    # Where the process writes its real log, if not to stdout (e.g. Kafka's server.log).
    diagnostic_log: Path | None = None
    # Turns the log text of a failed start into advice for the user, when it recognises it.
    advise: Callable[[str], str | None] = lambda text: None
    # The code it loads once at start (e.g. Airflow plugins): when this digest differs
    # from the one recorded at start, a running process is restarted to pick it up.
    code_digest: Callable[[], str] | None = None

    @property
    def digest_file(self) -> Path:
        return self.run_dir / f"{self.name}.code"

    def started_with(self) -> str:
        """What the process takes in once, at start: its command line, environment
        and code. A new release that changes a flag (say, a security setting)
        restarts the running process at the next `make up`, rather than leaving
        the old one serving."""
        import hashlib

        given = json.dumps([list(self.argv), sorted(self.env.items())], default=str)
        code = self.code_digest() if self.code_digest is not None else ""
        return hashlib.sha256((given + code).encode()).hexdigest()

    def code_changed(self) -> bool:
        recorded = self.digest_file.read_text() if self.digest_file.exists() else ""
        return recorded != self.started_with()

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def pid(self) -> int | None:
        """The recorded process group leader if it still runs; clears a stale pid file."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                return pid
        except psutil.NoSuchProcess:
            pass
        self.pid_file.unlink(missing_ok=True)
        return None

    def healthy(self) -> bool:
        try:
            return self.health()
        except Exception:  # a health probe failing in any way means "not ready"
            return False

    def start(self) -> bool:
        """Start unless already healthy. Returns True if this call started it."""
        if self.pid() is not None:
            if self.code_changed():
                log.info("%s: its code changed since it started; restarting it", self.name)
                self.stop()
            elif self.wait_healthy(timeout=self.start_timeout, quiet=True):
                log.info("%s: already running (pid %s)", self.name, self.pid())
                return False
            else:
                log.warning("%s: found running but not healthy; restarting it", self.name)
                self.stop()
        for host, port in self.ports:
            owner = port_owner(host, port)
            if owner:
                raise StackError(
                    f"{self.name}: port {host}:{port} is taken by {owner}; stop that process "
                    f"or choose another port in .env (see .env.example)."
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            out.write(f"\n==== {time.strftime('%F %T')} starting {self.name}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,  # its own process group: stop signals reach children
            )
        self.pid_file.write_text(str(proc.pid))
        self.digest_file.write_text(self.started_with())
        log.info("%s: started (pid %s), waiting for its health check", self.name, proc.pid)
        if not self.wait_healthy(timeout=self.start_timeout, proc=proc):
            code = proc.poll()
            self.stop()
            why = f"exited with code {code}" if code is not None else "did not become healthy"
            log_path = self.diagnostic_log or self.log_file
            text = tail(log_path, 200)
            advice = self.advise(text)
            raise StackError(
                f"{self.name} {why} within {self.start_timeout:.0f} s"
                + (f": {advice}" if advice else "")
                + f"\nits log {log_path} ends with:\n{tail(log_path)}"
            )
        return True

    def wait_healthy(
        self, *, timeout: float, proc: subprocess.Popen[bytes] | None = None, quiet: bool = False
    ) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while time.monotonic() < deadline:
            if self.healthy():
                return True
            if proc is not None and proc.poll() is not None:
                return False
            if proc is None and self.pid() is None:
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        if not quiet:
            log.error("%s: not healthy after %.0f s", self.name, timeout)
        return False

    def stop(self) -> bool:
        """Signal the whole process group and wait; SIGKILL after `stop_timeout`.
        Returns True if something was running."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            pgid = os.getpgid(pid)
            os.killpg(pgid, self.stop_signal)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return False
        # start_new_session made the leader's pid the session id too; children that
        # open their own process group (Airflow's task runners) stay in the session.
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and _session_members(pid):
            time.sleep(0.2)
        if _session_members(pid):
            log.warning("%s: still running after %.0f s; killing it", self.name, self.stop_timeout)
            for member in _session_members(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        log.info("%s: stopped", self.name)
        return True


def _session_members(sid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members
