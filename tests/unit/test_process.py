"""ManagedProcess against real processes (a local HTTP server), not mocks."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from pipeline.stack.process import ManagedProcess, StackError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_server(tmp_path: Path, port: int, name: str = "web") -> ManagedProcess:
    # A shell parent with a python child: stopping must reach the whole group.
    return ManagedProcess(
        name=name,
        argv=["bash", "-c", f"{sys.executable} -m http.server {port} --bind 127.0.0.1; true"],
        run_dir=tmp_path / "run",
        log_file=tmp_path / "logs" / f"{name}.log",
        health=lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200,
        ports=[("127.0.0.1", port)],
        start_timeout=20,
        stop_timeout=10,
    )


def test_start_is_idempotent_and_stop_ends_the_whole_group(tmp_path: Path) -> None:
    proc = _http_server(tmp_path, _free_port())
    assert proc.start() is True
    pid = proc.pid()
    assert pid is not None and proc.healthy()
    children = psutil.Process(pid).children(recursive=True)
    assert children, "the shell should have a python child"
    assert proc.start() is False  # second start: already healthy, left alone
    assert proc.pid() == pid
    assert proc.stop() is True
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert proc.pid() is None and not proc.pid_file.exists()
    assert proc.stop() is False  # stopping nothing is harmless


def test_port_taken_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    port = _free_port()
    squatter = _http_server(tmp_path, port, name="squatter")
    squatter.start()
    try:
        other = _http_server(tmp_path, port, name="web")
        other.health = lambda: False  # it is not "our" service answering there
        with pytest.raises(StackError, match=rf"port 127.0.0.1:{port} is taken by pid \d+"):
            other.start()
    finally:
        squatter.stop()


def test_stale_pid_file_is_cleared(tmp_path: Path) -> None:
    proc = _http_server(tmp_path, _free_port())
    proc.run_dir.mkdir(parents=True)
    dead = psutil.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    proc.pid_file.write_text(str(dead.pid))
    assert proc.pid() is None
    assert not proc.pid_file.exists()


def test_a_process_that_dies_at_start_reports_its_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        name="broken",
        argv=["bash", "-c", "echo 'config file is missing' >&2; exit 3"],
        run_dir=tmp_path / "run",
        log_file=tmp_path / "broken.log",
        health=lambda: False,
        start_timeout=10,
    )
    with pytest.raises(StackError, match=r"broken exited with code 3(.|\n)*config file is missing"):
        proc.start()


def test_a_process_whose_code_changed_is_restarted_and_an_unchanged_one_is_not(
    tmp_path: Path,
) -> None:
    code = tmp_path / "plugin.py"
    code.write_text("v1")
    proc = _http_server(tmp_path, _free_port())
    proc.code_digest = code.read_text
    try:
        assert proc.start() is True
        first = proc.pid()
        assert proc.start() is False and proc.pid() == first
        code.write_text("v2")
        assert proc.code_changed()
        assert proc.start() is True  # restarted to load the new code
        assert proc.pid() != first and not proc.code_changed()
    finally:
        proc.stop()


def test_a_process_started_with_other_flags_is_restarted(tmp_path: Path) -> None:
    # A release that changes a flag (e.g. MLflow's --allowed-hosts) reaches a running stack.
    proc = _http_server(tmp_path, _free_port())
    try:
        assert proc.start() is True
        first = proc.pid()
        proc.env = {"SOME_FLAG": "new"}
        assert proc.code_changed()
        assert proc.start() is True
        assert proc.pid() != first and not proc.code_changed()
        assert proc.start() is False  # and then left alone
    finally:
        proc.stop()
