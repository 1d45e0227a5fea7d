from __future__ import annotations

from pathlib import Path

import pytest

# Fixtures shared by the stream and fault tests (scratch topics, the race).
pytest_plugins = ["tests.integration.streams", "tests.integration.faults"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Mark by folder so `pytest -m "not integration"` runs just the fast tests.
    for item in items:
        path = str(item.path)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        elif "/tests/e2e/" in path:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def race_export() -> Path:
    """The 2023 Monaco race export (the demo race), made from the FastF1 cache
    if this checkout has not exported it yet (a fresh clone in CI)."""
    from pipeline.settings import SAMPLE_FASTF1_CACHE, get_settings
    from pipeline.sources.export import export_session, read_manifest

    if read_manifest("2023_Monaco_R") is None:
        if not SAMPLE_FASTF1_CACHE.is_dir():
            pytest.skip("the offline FastF1 sample is not beside the project")
        export_session(2023, "Monaco", "R", formats=("parquet",))
    return get_settings().export_dir / "2023_Monaco_R"
