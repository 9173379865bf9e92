"""Per-image records: what a run's logged model answered on each validation and test image.

One row per scored image: `index` (the image's row in its MNIST file), `label`, `predicted`
and `p_predicted` (the probability the model gave its answer). Written by training for the
model it logs (its last epoch), read by `compare` for intervals that count images and for
McNemar's test. Imports neither torch nor MLflow: arrays in, arrays and parquet files out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("index", "label", "predicted", "p_predicted")


class RecordsError(ValueError):
    """A records file that is not what training writes (columns, lengths, values)."""


@dataclass(frozen=True)
class Records:
    """Per-image answers of one model on one set of images, in the set's order."""

    index: np.ndarray  # int64: row in the MNIST file
    label: np.ndarray  # int64
    predicted: np.ndarray  # int64
    p_predicted: np.ndarray  # float32

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, name)) for name in COLUMNS}
        if len(lengths) != 1:
            raise RecordsError(f"columns of different lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.label

    @property
    def accuracy(self) -> float:
        """Percent of images answered right, as the run's accuracy metrics are."""
        return 100.0 * float(self.correct.mean()) if len(self) else float("nan")

    def mistakes(self, count: int) -> np.ndarray:
        """Positions of the `count` most confident wrong answers, most confident first."""
        wrong = np.flatnonzero(~self.correct)
        return wrong[np.argsort(-self.p_predicted[wrong], kind="stable")][:count]

    def write(self, path: Path) -> Path:
        table = pa.table({"index": pa.array(self.index, pa.int64()),
                          "label": pa.array(self.label, pa.int64()),
                          "predicted": pa.array(self.predicted, pa.int64()),
                          "p_predicted": pa.array(self.p_predicted, pa.float32())})
        pq.write_table(table, path)
        return path

    @classmethod
    def read(cls, path: Path | str) -> Records:
        """The records in `path`; RecordsError when it is not a records file."""
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise RecordsError(f"not a parquet file ({err})") from None
        missing = [name for name in COLUMNS if name not in table.column_names]
        if missing:
            raise RecordsError(f"no column {missing[0]!r}")
        columns = {name: table.column(name).to_numpy() for name in COLUMNS}
        return cls(columns["index"].astype(np.int64), columns["label"].astype(np.int64),
                   columns["predicted"].astype(np.int64),
                   columns["p_predicted"].astype(np.float32))

    def digest(self) -> str:
        """Names the images scored (their rows and labels): equal digests pair per image."""
        content = self.index.astype(np.int64).tobytes() + self.label.astype(np.int64).tobytes()
        return hashlib.sha256(content).hexdigest()[:16]

    def aligned_with(self, other: Records) -> bool:
        """Whether both score the same images in the same order (paired per image)."""
        return len(self) == len(other) and bool(np.array_equal(self.index, other.index)
                                                and np.array_equal(self.label, other.label))
