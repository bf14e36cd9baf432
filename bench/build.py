"""Building a feature set from a large source: peak memory and rows/s of ``build_feature_set`` on a
Parquet file of 1,000,000 rows x 64 float columns (standardized, split 70/15/15), beside reading
the same file with pyarrow alone; then the same for the same rows as a CSV file. Each runs in a
fresh Python process whose peak resident memory is taken: its own, ``VmHWM`` of
``/proc/self/status`` (``ru_maxrss`` would count the parent's too: Linux keeps the high-water mark
of the process that spawned it across ``exec``). The ratio printed last is raylens' peak ÷
pyarrow's, for the Parquet file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = 64

_PEAK = """
def _peak_mb():
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) / 1024
"""

_READ = """
import json, sys, time
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
began = time.perf_counter()
table = pacsv.read_csv(sys.argv[1]) if sys.argv[1].endswith(".csv") else pq.read_table(sys.argv[1])
took = time.perf_counter() - began
print(json.dumps({"seconds": took, "rows": table.num_rows,
                  "peak_mb": _peak_mb()}))
"""

_BUILD = """
import json, sys, time
from pathlib import Path
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
began = time.perf_counter()
fs = build_feature_set(
    "big", DataConfig(source=sys.argv[1], target="target", split={"valid": 0.15, "test": 0.15}),
    FeaturesConfig(transforms=[{"standardize": "*"}]), Path(sys.argv[2]))
took = time.perf_counter() - began
print(json.dumps({"seconds": took, "rows": sum(fs.manifest.rows.values()),
                  "peak_mb": _peak_mb()}))
"""


def _write_source(path: Path, rows: int) -> None:
    """The source, written in chunks of 100,000 rows (never whole in this process)."""
    rng = np.random.default_rng(0)
    schema = pa.schema(
        [*(pa.field(f"x{i}", pa.float64()) for i in range(COLUMNS)), pa.field("target", pa.int64())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            x = rng.normal(size=(n, COLUMNS))
            arrays = [pa.array(x[:, i]) for i in range(COLUMNS)] + [pa.array((x[:, 0] > 0).astype(np.int64))]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))


def _write_csv(parquet: Path, csv: Path) -> None:
    """The same rows as a CSV file (decimals to 6 significant digits), batch by batch."""
    import pyarrow.csv as pacsv

    file = pq.ParquetFile(parquet)
    with pacsv.CSVWriter(csv, file.schema_arrow) as writer:
        for batch in file.iter_batches(batch_size=100_000):
            rounded = [pa.compute.round(c, 6) if pa.types.is_floating(c.type) else c for c in batch.columns]
            writer.write_batch(pa.RecordBatch.from_arrays(rounded, schema=batch.schema))


def _measure(script: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK + script, *args], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = 100_000 if args.quick else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.parquet"
        _write_source(source, rows)
        read = _measure(_READ, str(source))
        build = _measure(_BUILD, str(source), str(Path(tmp) / "store"))
        csv = Path(tmp) / "source.csv"
        _write_csv(source, csv)
        source.unlink()
        csv_read = _measure(_READ, str(csv))
        csv_build = _measure(_BUILD, str(csv), str(Path(tmp) / "csv-store"))
    matrix_mb = rows * COLUMNS * 8 / 2**20
    return {
        "rows": rows,
        "columns": COLUMNS,
        "float64_matrix_mb": matrix_mb,
        "csv_pyarrow_read_s": csv_read["seconds"],
        "csv_pyarrow_peak_mb": csv_read["peak_mb"],
        "csv_raylens_build_s": csv_build["seconds"],
        "csv_raylens_peak_mb": csv_build["peak_mb"],
        "csv_raylens_rows_per_s": rows / csv_build["seconds"],
        "pyarrow_read_s": read["seconds"],
        "pyarrow_peak_mb": read["peak_mb"],
        "pyarrow_rows_per_s": rows / read["seconds"],
        "raylens_build_s": build["seconds"],
        "raylens_peak_mb": build["peak_mb"],
        "raylens_rows_per_s": rows / build["seconds"],
        "ratio": build["peak_mb"] / read["peak_mb"],
    }
