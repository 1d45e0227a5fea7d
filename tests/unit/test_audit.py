"""`make audit`'s verdicts on pip-audit reports (the real run needs PyPI's advisory data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline import audit

FIXABLE = {"id": "PYSEC-1", "aliases": ["CVE-1"], "fix_versions": ["2.0"]}
UNFIXED = {"id": "GHSA-x", "aliases": [], "fix_versions": []}


def _report(*deps: dict[str, Any]) -> dict[str, Any]:
    return {"dependencies": list(deps), "fixes": []}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_probe", lambda a: "probe skipped")
    monkeypatch.setattr(audit, "IGNORED", {})
    monkeypatch.delenv("AUDIT_REQUIRE_DATA", raising=False)


def test_a_vulnerability_with_a_fix_fails() -> None:
    found = audit.parse_report("env", _report({"name": "a", "version": "1.0", "vulns": [FIXABLE]}))
    assert [f.fails for f in found.findings] == [True]
    assert audit.report([found]) == 1


def test_an_ignored_id_or_alias_does_not_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "IGNORED", {"CVE-1": "a needs b<2, which pins a<2"})
    found = audit.parse_report("env", _report({"name": "a", "version": "1.0", "vulns": [FIXABLE]}))
    assert audit.report([found]) == 0


def test_a_vulnerability_without_a_fix_is_listed_but_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    found = audit.parse_report("env", _report({"name": "a", "version": "1.0", "vulns": [UNFIXED]}))
    assert audit.report([found]) == 0
    assert "a==1.0  GHSA-x  (no fixed version yet)" in capsys.readouterr().out


def test_packages_without_advisory_data_are_reported_not_passed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    skipped = {"name": "a", "skip_reason": "Dependency not found on PyPI"}
    found = audit.parse_report("env", _report(skipped), pins={"a": "1.0"})
    assert found.not_audited == {"a==1.0": "Dependency not found on PyPI"}
    assert found.audited == 0
    assert audit.report([found]) == 0
    out = capsys.readouterr().out
    assert "AUDIT NOT DONE" in out and "no known vulnerability" not in out
    monkeypatch.setenv("AUDIT_REQUIRE_DATA", "1")
    assert audit.report([found]) == 2


def test_a_failed_pip_audit_is_not_a_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.report([audit.Audit("env", error="ConnectionError")]) == 0
    assert "AUDIT NOT DONE" in capsys.readouterr().out


def test_clean_when_everything_was_audited(capsys: pytest.CaptureFixture[str]) -> None:
    clean = audit.parse_report("env", _report({"name": "a", "version": "1.0", "vulns": []}))
    assert audit.report([clean]) == 0
    assert "audit passed" in capsys.readouterr().out


def test_pins_are_read_from_a_uv_export(tmp_path: Path) -> None:
    exported = tmp_path / "requirements.txt"
    exported.write_text(
        "# comment\nFoo_Bar==1.2.3 \\\n    --hash=sha256:00\n"
        "colorama==0.4.6 ; sys_platform == 'win32' \\\n    --hash=sha256:11\n"
    )
    assert audit.read_pins(exported) == {"foo-bar": "1.2.3", "colorama": "0.4.6"}
