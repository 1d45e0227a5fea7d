"""Training data: an export's samples mapped onto the message schema (exactly
what the consumer sees), their features and their labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.ml.features import race_features
from pipeline.ml.labels import DEFAULT_HORIZON_S, label_samples, load_side_tables
from pipeline.settings import Settings, get_settings
from pipeline.sources.replay import load_samples

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Dataset:
    session_key: str
    features: pd.DataFrame
    labels: pd.DataFrame  # one column per model
    groups: pd.Series  # "session:driver": one car in one race, never split by CV

    def __len__(self) -> int:
        return len(self.features)


def build(
    session_key: str,
    *,
    horizon_s: float = DEFAULT_HORIZON_S,
    sample_every: int = 1,
    settings: Settings | None = None,
) -> Dataset:
    """Samples of one export that lie within a lap (the race itself, not the
    grid before it or the parade after), every `sample_every`-th per car."""
    import pandas as pd

    from pipeline.kafka.producer import message_columns

    settings = settings or get_settings()
    folder = settings.export_dir / session_key
    samples = load_samples(folder)
    samples["seq"] = samples.groupby("driver_number").cumcount()
    side = load_side_tables(folder, samples)
    labels = label_samples(samples, side, horizon_s)
    stream_view = pd.DataFrame(message_columns(samples, "training", session_key))
    features = race_features(stream_view)
    keep = samples["lap_number"].notna() & (samples["seq"] % sample_every == 0)
    groups = session_key + ":" + samples["driver_number"].astype(str)
    return Dataset(
        session_key,
        features[keep].reset_index(drop=True),
        labels[keep].reset_index(drop=True),
        groups[keep].reset_index(drop=True),
    )


def concat(parts: list[Dataset]) -> Dataset:
    import pandas as pd

    return Dataset(
        "+".join(p.session_key for p in parts),
        pd.concat([p.features for p in parts], ignore_index=True),
        pd.concat([p.labels for p in parts], ignore_index=True),
        pd.concat([p.groups for p in parts], ignore_index=True),
    )


LABEL_PREFIX = "label__"
GROUP_COLUMN = "group__"


def save(data: Dataset, path: Path) -> Path:
    """One Parquet file: features, labels (prefixed) and the CV groups; the session
    key travels in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = data.features.assign(
        **{f"{LABEL_PREFIX}{c}": data.labels[c] for c in data.labels.columns},
        **{GROUP_COLUMN: data.groups},
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"session_key": data.session_key.encode()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def load(path: Path) -> Dataset:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    frame = table.to_pandas()
    labels = [c for c in frame.columns if c.startswith(LABEL_PREFIX)]
    features = [c for c in frame.columns if c not in labels and c != GROUP_COLUMN]
    return Dataset(
        (table.schema.metadata or {})[b"session_key"].decode(),
        frame[features],
        frame[labels].rename(columns=lambda c: c.removeprefix(LABEL_PREFIX)),
        frame[GROUP_COLUMN],
    )
