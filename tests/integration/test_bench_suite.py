"""The benchmark suite, once with tiny loads (`quick`): every section measured, every
ratio made of two figures of the same run, the report written, nothing left behind.
Figures, not pass/fail: no speed is asserted."""

from __future__ import annotations

import math
import time
from pathlib import Path

from pipeline.bench import suite
from pipeline.kafka.topics import admin_client
from pipeline.ml.labels import LABELS
from pipeline.ml.registry import scratch_models
from pipeline.ml.train import prepare, train_one
from pipeline.settings import Settings
from tests.integration.test_ml import QUICK


def _topics(settings: Settings) -> set[str]:
    return set(admin_client(settings).list_topics(timeout=15).topics)


def test_the_quick_suite_measures_every_section_and_cleans_up(
    stack: Settings, race_export: Path, tmp_path: Path
) -> None:
    # Models of its own (a fresh stack has none to serve or time), deleted afterwards.
    with scratch_models(stack, "bench", laps_dir=tmp_path / "laps") as models:
        split, laps = prepare(QUICK, models)
        for label in LABELS:
            train_one(label, laps, split, QUICK, models)
        _check_the_quick_suite(models, race_export, tmp_path)


def _check_the_quick_suite(stack: Settings, race_export: Path, tmp_path: Path) -> None:
    before = _topics(stack)
    report = suite.run(stack, export_folder=race_export, quick=True)
    path = suite.write(report, tmp_path / "benchmarks.md")

    assert [s.key for s in report.sections] == list(suite.SECTIONS)
    for section in report.sections:
        assert section.error is None, f"{section.key}: {section.error}\n{section.notes}"
        assert section.figures and section.method, section.key
        for label, value in section.figures.items():
            assert math.isfinite(value), (section.key, label, value)
            if label not in section.signed:
                assert value > 0, (section.key, label, value)
        for row in section.rows:
            assert math.isfinite(row.ours) and (row.signed or row.ours > 0), (section.key, row)
            if row.reference is not None:  # a ratio: two figures measured in this run
                assert row.reference > 0 and row.reference_what, (section.key, row)
                assert row.ratio == row.ours / row.reference
            if row.target is not None and (row.target.on == "ours" or row.ratio is not None):
                assert row.met is not None, (section.key, row)
    latency = next(s for s in report.sections if s.key == "latency")
    for stage in suite.STAGES.values():  # where the 1x latency goes, stage by stage
        assert f"1x: {stage}, p50 (ms)" in latency.figures, stage
    stream_rows = {s.key: s.rows for s in report.sections}
    for key in ("producer", "decode", "consumer"):  # measured against Kafka's own tools
        assert all(r.reference is not None for r in stream_rows[key]), key

    text = path.read_text()
    assert "## Machine" in text and "cores (usable: sched_getaffinity)" in text
    assert report.machine["Kafka (broker and its tools)"] in text
    assert "## Summary" in text
    assert "| what | ours | Kafka's tool (or reference), same run | ratio | target | met |" in text
    for section in report.sections:
        assert f". {section.title}" in text

    # Every scratch topic the suite made (its sections' named in the report, its
    # helpers' such as the scaling points' and the live page's), and none is left:
    # deleting a topic takes the broker a moment, a minute at most. Topics other
    # runs beside it make and remove are not the suite's: only its prefixes count.
    made = set(report.scratch_topics)
    prefixes = ("bench-stream-", "bench-producer-", "bench-paced-", "bench-e2e-", "bench-memory-")
    assert {p for p in prefixes if any(t.startswith(p) for t in made)} == set(prefixes)
    ours = ("bench-", "scaling-", "live-")
    deadline = time.monotonic() + 60
    while True:
        left = {t for t in _topics(stack) - before if t.startswith(ours)} | (made & _topics(stack))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"scratch topics left behind: {sorted(left)}"
