"""`make audit`: known vulnerabilities in the locked dependencies of both environments.

Each environment's pins come from `uv export` of `uv.lock`, the same selection that
infra/bootstrap.sh installs (`.venv`: the default groups; `.venv-superset`: the
`superset` group alone), and pip-audit looks every pin up in its default service,
PyPI's JSON API (`/pypi/<name>/<version>/json`, which carries PyPI's advisories).

- A vulnerability with a fixed version fails the audit (exit 1), unless its id is in
  IGNORED with the reason it cannot be upgraded yet.
- One with no fixed version is listed but does not fail: there is nothing to move to.
- A pin whose advisory data could not be fetched is NOT AUDITED, and the run says so
  in capitals. It fails only with AUDIT_REQUIRE_DATA=1, so that a machine without
  the advisory data (PyPI mirrors often lack the per-release JSON) can still run CI,
  loudly, rather than pass in silence as plain pip-audit does ("No known
  vulnerabilities found" after skipping every package).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.settings import PROJECT_ROOT

# Advisory id -> why it is accepted for now (package, why the fix does not resolve with
# the rest of the lock, when to look again). Only ids with a fixed version need a line:
# vulnerabilities without any fix are reported and never fail the audit.
IGNORED: dict[str, str] = {}

# name -> `uv export` arguments, as infra/bootstrap.sh installs each environment.
ENVIRONMENTS: dict[str, list[str]] = {
    ".venv (default groups: airflow, dev)": [],
    ".venv-superset (group superset)": ["--only-group", "superset"],
}
ADVISORY_URL = "https://pypi.org/pypi/{name}/{version}/json"


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]

    @property
    def ignored(self) -> bool:
        return bool({self.id, *self.aliases} & IGNORED.keys())

    @property
    def fails(self) -> bool:
        return bool(self.fixed_in) and not self.ignored

    def line(self) -> str:
        names = " / ".join((self.id, *self.aliases))
        if self.ignored:
            reason = next(IGNORED[i] for i in (self.id, *self.aliases) if i in IGNORED)
            state = f"ignored: {reason}"
        elif self.fixed_in:
            state = f"FIX AVAILABLE: {', '.join(self.fixed_in)}"
        else:
            state = "no fixed version yet"
        return f"  {self.package}=={self.version}  {names}  ({state})"


@dataclass
class Audit:
    environment: str
    pinned: int = 0
    findings: list[Finding] = field(default_factory=list)
    not_audited: dict[str, str] = field(default_factory=dict)  # name==version -> why
    error: str = ""  # pip-audit itself failed (no report)

    @property
    def audited(self) -> int:
        return self.pinned - len(self.not_audited)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(requirements: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a requirements file."""
    pins = {}
    for line in requirements.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            pins[_canonical(match[1])] = match[2]
    return pins


def parse_report(
    environment: str, report: dict[str, Any], pins: dict[str, str] | None = None
) -> Audit:
    """pip-audit's JSON report (`-f json`) as an Audit; `pins` supplies the versions
    pip-audit leaves out of a skipped package."""
    audit = Audit(environment, pinned=len(report.get("dependencies", [])))
    for dep in report.get("dependencies", []):
        name = dep["name"]
        version = dep.get("version") or (pins or {}).get(_canonical(name), "?")
        if "skip_reason" in dep:
            audit.not_audited[f"{name}=={version}"] = dep["skip_reason"]
            continue
        for vuln in dep.get("vulns", []):
            audit.findings.append(
                Finding(
                    package=name,
                    version=version,
                    id=vuln["id"],
                    aliases=tuple(vuln.get("aliases") or ()),
                    fixed_in=tuple(vuln.get("fix_versions") or ()),
                )
            )
    return audit


def _uv() -> list[str]:
    uv = shutil.which("uv")
    return [uv] if uv else ["python3", "-m", "uv"]  # as infra/bootstrap.sh finds it


def export(uv_args: Sequence[str], out: Path) -> None:
    subprocess.run(
        [*_uv(), "export", "--frozen", "--no-emit-project", "--quiet", *uv_args, "-o", str(out)],
        cwd=PROJECT_ROOT,
        check=True,
    )


def run_pip_audit(environment: str, requirements: Path, folder: Path) -> Audit:
    report = folder / "report.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "pip_audit", "--requirement", str(requirements),
            "--disable-pip", "--no-deps",  # the export is the full, pinned, hashed set
            "--format", "json", "--output", str(report), "--aliases", "on", "--desc", "off",
            "--progress-spinner", "off",
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    # pip-audit exits 1 when it found something; no report at all means it failed.
    if not report.exists() or not report.read_text().strip():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        return Audit(environment, error="\n".join(tail) or f"exit {result.returncode}")
    return parse_report(environment, json.loads(report.read_text()), read_pins(requirements))


def _probe(audit: Audit) -> str:
    """Why the advisory data is missing, from one request for the first pin."""
    import httpx

    pin = next(iter(audit.not_audited), "")
    name, _, version = pin.partition("==")
    url = ADVISORY_URL.format(name=name, version=version)
    try:
        status = httpx.get(url, timeout=15).status_code
    except httpx.HTTPError as err:
        return f"{url}: {err.__class__.__name__} ({err})"
    return f"{url} answered HTTP {status}"


def report(audits: list[Audit]) -> int:
    """Print what was found; the exit code (see the module docstring)."""
    failing = 0
    unaudited = 0
    for audit in audits:
        print(f"\n== {audit.environment}")
        if audit.error:
            print(f"  pip-audit failed, nothing was audited:\n    {audit.error}")
            unaudited += 1
            continue
        print(f"  {audit.pinned} pinned packages, {audit.audited} audited")
        for finding in sorted(audit.findings, key=lambda f: (not f.fails, f.package)):
            print(finding.line())
        failing += sum(f.fails for f in audit.findings)
        if audit.not_audited:
            unaudited += len(audit.not_audited)
            print(
                f"  NOT AUDITED: {len(audit.not_audited)} of {audit.pinned} packages had no "
                f"advisory data; {_probe(audit)}"
            )
            if audit.audited:
                for pin, why in sorted(audit.not_audited.items()):
                    print(f"    {pin}: {why}")
    found = {i for a in audits for f in a.findings for i in (f.id, *f.aliases)}
    for stale in sorted(IGNORED.keys() - found) if not unaudited else []:
        print(f"\nIGNORED lists {stale}, which no longer applies: remove it.")
    print()
    if failing:
        print(f"audit FAILED: {failing} known vulnerabilities have a fixed version. Upgrade "
              "(uv lock --upgrade-package NAME), or add the id to IGNORED in "
              "pipeline/audit.py with the reason.")  # fmt: skip
        return 1
    if unaudited:
        print(
            "=" * 78 + "\nAUDIT NOT DONE: the advisory data (PyPI's JSON API, per release) could "
            "not be\nreached for the packages above, so they were NOT checked for known "
            "vulnerabilities.\nThis is not a clean result. Run `make audit` where pypi.org "
            "serves /pypi/<name>/<version>/json.\n" + "=" * 78
        )
        return 2 if os.environ.get("AUDIT_REQUIRE_DATA") == "1" else 0
    print("audit passed: no known vulnerability with a fixed version in either environment.")
    return 0


def main() -> None:
    audits: list[Audit] = []
    with tempfile.TemporaryDirectory(prefix="f1-audit-") as tmp:
        for environment, uv_args in ENVIRONMENTS.items():
            folder = Path(tmp) / str(len(audits))
            folder.mkdir()
            requirements = folder / "requirements.txt"
            export(uv_args, requirements)
            audits.append(run_pip_audit(environment, requirements, folder))
    sys.exit(report(audits))


if __name__ == "__main__":
    main()
