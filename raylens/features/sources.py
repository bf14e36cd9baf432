"""Data sources: where raw rows come from.

A source URI is one of
- ``sklearn:<name>``: a data set bundled with scikit-learn (digits, iris, wine, breast_cancer,
  diabetes); its target column is ``target``, as with ``load_*(as_frame=True)``;
- ``synthetic:classification`` or ``synthetic:regression`` with optional query parameters
  (``?rows=1000&features=20&classes=3&seed=0``), generated chunk by chunk (any size);
- a path to a ``.parquet`` or ``.csv`` file, or to a folder of them (relative paths are resolved
  against the spec file's folder).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raylens.errors import UserError, did_you_mean

BUNDLED = ("digits", "iris", "wine", "breast_cancer", "diabetes")
SYNTHETIC = ("classification", "regression")
_SYNTHETIC_PARAMS = {"rows", "features", "classes", "informative", "noise", "seed"}


@dataclass(frozen=True)
class RawData:
    """Rows as loaded, plus a fingerprint that changes whenever the source's content does."""

    table: pa.Table
    uri: str
    fingerprint: str


@dataclass(frozen=True)
class SourceStream:
    """A source read batch by batch, as many times as asked: every pass gives the same rows in the
    same order, each batch in ``schema`` (the files' types unified as one table of them would
    hold them), so a build can pass over a source larger than memory."""

    uri: str
    fingerprint: str
    schema: pa.Schema
    _read: Callable[[int], Iterator[pa.RecordBatch]]
    _widened: Callable[[], SourceStream] | None = None
    rows: int | None = None
    """How many rows a pass gives, where that is known before reading them (not for CSV)."""

    def batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """One pass over the rows, in batches of at most ``rows``. Raises ``WiderTypes`` where a
        CSV file's later rows need wider types than its first block showed: read ``widened()``."""
        return self._read(rows)

    def widened(self) -> SourceStream:
        """The same source with each CSV file's types taken from the whole file (read whole once)."""
        if self._widened is None:
            raise RuntimeError(f"{self.uri}: only a CSV source's types widen")
        return self._widened()


def table_stream(table: pa.Table, uri: str, fingerprint: str) -> SourceStream:
    """A table already in memory, as a stream."""
    return SourceStream(
        uri,
        fingerprint,
        table.schema,
        lambda rows: iter(table.to_batches(max_chunksize=rows)),
        rows=table.num_rows,
    )


def load_source(uri: str, base_dir: Path | None = None) -> RawData:
    """Load ``uri`` into an Arrow table; raise ``UserError`` naming the fix when it can't."""
    stream = open_source(uri, base_dir)
    try:
        batches = list(stream.batches(READ_BATCH_ROWS))
    except WiderTypes:
        stream = stream.widened()
        batches = list(stream.batches(READ_BATCH_ROWS))
    return RawData(pa.Table.from_batches(batches, schema=stream.schema), stream.uri, stream.fingerprint)


def open_source(uri: str, base_dir: Path | None = None) -> SourceStream:
    """``uri`` as a stream of batches; its schema is known and checked before the first row is
    read (a CSV file's from its first block). ``UserError`` naming the fix when it can't."""
    scheme, _, rest = uri.partition(":")
    if scheme == "sklearn":
        raw = _load_bundled(rest, uri)
        return table_stream(raw.table, uri, raw.fingerprint)
    if scheme == "synthetic":
        return _synthetic_stream(rest, uri)
    path = Path(uri).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    # The manifest records the uri, and the version hashes the manifest: './d.csv', 'd.csv' and
    # 'a/../d.csv' name the same data, so they must give the same version.
    return _open_files(path, os.path.normpath(uri))


def source_fingerprint(uri: str, base_dir: Path | None = None) -> str | None:
    """The fingerprint ``load_source(uri)`` gives, without parsing the rows (a file's bytes are
    still hashed); None where only loading can tell (a missing path, an unknown data set)."""
    scheme, _, rest = uri.partition(":")
    if scheme == "sklearn":
        if rest not in BUNDLED:
            return None
        import sklearn

        return f"{uri}@scikit-learn-{sklearn.__version__}"
    if scheme == "synthetic":
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return _fingerprint_files(data_files(path, os.path.normpath(uri)).paths)
    except (UserError, OSError):
        return None


def _load_bundled(name: str, uri: str) -> RawData:
    if name not in BUNDLED:
        raise UserError(
            f"data.source: unknown scikit-learn data set '{name}'{did_you_mean(name, BUNDLED)}; "
            f"bundled sets are: {', '.join(BUNDLED)}"
        )
    import sklearn
    from sklearn import datasets

    frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return RawData(table, uri, f"{uri}@scikit-learn-{sklearn.__version__}")


def _synthetic_stream(spec: str, uri: str) -> SourceStream:
    generate, rows = _synthetic(spec, uri)

    def read(batch_rows: int) -> Iterator[pa.RecordBatch]:
        for i, start in enumerate(range(0, rows, SYNTHETIC_CHUNK_ROWS)):
            chunk = generate.chunk(i, min(SYNTHETIC_CHUNK_ROWS, rows - start))
            for offset in range(0, chunk.num_rows, batch_rows):
                yield chunk.slice(offset, batch_rows)

    return SourceStream(uri, uri, generate.chunk(0, 1).schema, read, rows=rows)


def _synthetic(spec: str, uri: str) -> tuple[_Generator, int]:
    """The generator and row count ``synthetic:<spec>`` asks for, checked."""
    parts = urlsplit(spec)
    kind = parts.path
    if kind not in SYNTHETIC:
        raise UserError(
            f"data.source: unknown synthetic kind '{kind}'{did_you_mean(kind, SYNTHETIC)}; "
            f"use synthetic:classification or synthetic:regression"
        )
    params: dict[str, float] = {}
    for key, value in parse_qsl(parts.query):
        if key not in _SYNTHETIC_PARAMS:
            raise UserError(
                f"data.source: unknown parameter '{key}' in '{uri}'; "
                f"known: {', '.join(sorted(_SYNTHETIC_PARAMS))}"
            )
        try:
            params[key] = float(value)
        except ValueError:
            raise UserError(f"data.source: parameter '{key}={value}' in '{uri}' must be a number") from None
    rows, n_features = int(params.get("rows", 1000)), int(params.get("features", 20))
    if rows < 1 or n_features < 1:
        raise UserError(f"data.source: '{uri}' needs rows >= 1 and features >= 1")
    seed = int(params.get("seed", 0))
    classes = int(params.get("classes", 2))
    # Distinct class centroids need 2**informative >= classes corners of the hypercube.
    needed = math.ceil(math.log2(2 * classes)) if kind == "classification" else 1
    informative = min(n_features, int(params.get("informative", max(needed, n_features // 2))))
    if kind == "classification" and (classes < 2 or 2**informative < classes):
        raise UserError(
            f"data.source: '{uri}' cannot be generated: {classes} classes need classes >= 2 and "
            f"2**informative >= classes (informative={informative})"
        )
    return _Generator(kind, n_features, informative, classes, params.get("noise", 0.1), seed), rows


SYNTHETIC_CHUNK_ROWS = 65_536
"""Rows generated at once: a synthetic source of any size costs its float32 table and one chunk."""


@dataclass(frozen=True)
class _Generator:
    """Rows of a synthetic source, chunk by chunk, each chunk from its own seeded stream (the
    same rows whatever the chunk is asked after). Classification: each class a corner of a
    hypercube in the informative columns, plus unit Gaussian noise (as scikit-learn's
    ``make_classification``, without redundant columns); regression: a random linear function of
    the informative columns plus ``noise``. Other columns are noise."""

    kind: str
    features: int
    informative: int
    classes: int
    noise: float
    seed: int

    def _structure(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.kind == "regression":
            return rng.uniform(0, 100, self.informative)
        # Distinct corners: the classes' numbers among 2**informative, written in bits as ±1.
        bits = min(self.informative, 62)
        corners = (
            rng.choice(2**bits, self.classes, replace=False)
            if bits < 62
            else rng.integers(0, 2**62, self.classes)
        )
        signs = ((corners[:, None] >> np.arange(bits)) & 1) * 2.0 - 1.0
        rest = rng.choice([-1.0, 1.0], (self.classes, self.informative - bits))
        # Scaled so two classes' centroids lie about 2 apart however many columns inform: classes
        # overlap under the unit noise as much with 64 columns as with 4 (a task worth learning).
        return np.concatenate([signs, rest], axis=1) * math.sqrt(2 / self.informative)

    def chunk(self, index: int, rows: int) -> pa.RecordBatch:
        structure = self._structure()
        # A stream per quantity: a chunk's first rows are the same however many rows it holds.
        x = np.random.default_rng([self.seed, index, 0]).standard_normal(
            (rows, self.features), dtype=np.float32
        )
        other = np.random.default_rng([self.seed, index, 1])
        if self.kind == "classification":
            y: np.ndarray = other.integers(0, self.classes, rows)
            x[:, : self.informative] += structure[y].astype(np.float32)
        else:
            y = x[:, : self.informative].astype(np.float64) @ structure + other.normal(0, self.noise, rows)
        columns = [pa.array(x[:, i].copy()) for i in range(self.features)] + [pa.array(y)]
        return pa.RecordBatch.from_arrays(columns, names=[*(f"x{i}" for i in range(self.features)), "target"])


def _open_files(path: Path, uri: str, whole_file_types: bool = False) -> SourceStream:
    files = data_files(path, uri)
    named = files.named()
    csv = files.format == "csv"
    # One file at a time, so an error names the file (Arrow's own messages often don't). In a
    # folder, a file is named relative to it: the messages name the folder too.
    if csv:
        schemas = [(shown, _csv_schema(file, shown, whole_file_types)) for file, shown in named]
        rows = None
    else:
        footers = [(shown, _parquet_footer(file, shown)) for file, shown in named]
        schemas = [(shown, schema) for shown, (schema, _) in footers]
        rows = sum(count for _, (_, count) in footers)
    schema = _unified(schemas, uri)

    def read(rows: int) -> Iterator[pa.RecordBatch]:
        for (file, shown), (_, own) in zip(named, schemas, strict=True):
            # A CSV file is read with the types found before the pass, so every pass and every
            # block agree (Arrow's streaming reader would infer them from the first block alone).
            types = dict(zip(own.names, own.types, strict=True)) if csv else None
            batches = stream_batches(
                file,
                shown,
                files.format,
                rows,
                column_types=types,
                first_block_types=csv and not whole_file_types,
            )
            for batch in batches:
                yield _conform(batch, schema)

    widened = None if not csv or whole_file_types else (lambda: _open_files(path, uri, whole_file_types=True))
    return SourceStream(uri, _fingerprint_files(files.paths), schema, read, widened, rows)


@dataclass(frozen=True)
class DataFiles:
    """The data files a path names: the file itself, or every file of one format in a folder."""

    root: Path
    paths: list[Path]
    format: str
    """"parquet" or "csv"."""

    def named(self) -> list[tuple[Path, str]]:
        """Each file with the name messages give it (relative to the folder, in a folder)."""
        return [(p, str(p.relative_to(self.root)) if self.root.is_dir() else str(p)) for p in self.paths]


def data_files(path: Path, uri: str, where: str = "data.source") -> DataFiles:
    """The .parquet or .csv files at ``path`` (a file or a folder, searched recursively);
    ``UserError`` naming ``where`` when there are none or the formats are mixed."""
    if not path.exists():
        raise UserError(f"{where}: '{uri}' does not exist (looked at {path})")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parquet = [p for p in files if p.suffix == ".parquet"]
    csv = [p for p in files if p.suffix == ".csv"]
    if parquet and csv:
        raise UserError(f"{where}: folder '{uri}' mixes .parquet and .csv files; keep one format")
    if not parquet and not csv:
        raise UserError(
            f"{where}: '{uri}' is not a .parquet or .csv file or a folder of them"
            + ("; use one of those, or sklearn:<name> / synthetic:<kind>" if where == "data.source" else "")
        )
    return DataFiles(path, parquet or csv, "parquet" if parquet else "csv")


def stream_batches(
    file: Path,
    shown: str,
    format: str,
    batch_rows: int,
    *,
    column_types: dict[str, pa.DataType] | None = None,
    where: str = "data.source",
    first_block_types: bool = False,
) -> Iterator[pa.RecordBatch]:
    """The rows of one file in batches of at most ``batch_rows``, never the whole file in memory,
    with the checks of a whole-file read (a CSV's delimiter and encoding, a truncated Parquet
    file); ``column_types`` fixes the types of CSV columns instead of inferring them per block.
    ``first_block_types``: they are what the first block showed, and a later value they cannot
    hold raises ``WiderTypes`` (not an error of the file)."""
    if format == "parquet":
        try:
            # Without pre-buffering: pyarrow's default reads ahead the column chunks of every row
            # group the iteration will visit (800 MB held for a 500 MB file, measured).
            yield from pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(
                f"{where}: cannot read Parquet file '{shown}' ({exc}); "
                "if it is truncated or corrupt, write it again from its source"
            ) from None
        return
    delimiter = _foreign_delimiter(file)
    if delimiter:
        raise _wrong_delimiter(shown, delimiter, where)
    try:
        reader = pacsv.open_csv(file, convert_options=pacsv.ConvertOptions(column_types=column_types or {}))
        for batch in reader:
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)
    except (pa.ArrowException, OSError) as exc:
        if first_block_types and "conversion error" in str(exc):
            raise WiderTypes(shown) from None
        if "utf8" in str(exc).lower():
            raise _not_utf8(shown, "some text", where) from None
        raise UserError(f"{where}: cannot read CSV file '{shown}' ({exc}); fix the file") from None


class WiderTypes(Exception):
    """A CSV file holds, past its first block, a value the first block's types cannot hold: the
    pass is to be read again with the types of the whole file (``SourceStream.widened``)."""


READ_BATCH_ROWS = 65_536
"""Rows decoded at once: reading holds one batch, not a second whole copy of a file in pyarrow's
decoding buffers."""


def _parquet_footer(path: Path, shown: str) -> tuple[pa.Schema, int]:
    """A Parquet file's schema and row count, from its footer alone."""
    try:
        metadata = pq.read_metadata(path)
        return metadata.schema.to_arrow_schema(), metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"data.source: cannot read Parquet file '{shown}' ({exc}); "
            "if it is truncated or corrupt, write it again from its source"
        ) from None


def _csv_schema(path: Path, shown: str, whole_file: bool) -> pa.Schema:
    """The types of a CSV file's columns: those its first block shows (read alone), or with
    ``whole_file`` those a read of the whole file gives (a column of whole numbers with a decimal
    far down becomes decimals). A bad file is read whole, to name what is wrong."""
    if not whole_file:
        try:
            schema = pacsv.open_csv(path).schema
            _check_csv_columns(path, shown, schema)
            return schema
        except (pa.ArrowException, OSError, UnicodeDecodeError):
            pass
    return _read_csv(path, shown).schema


def _read_csv(path: Path, shown: str) -> pa.Table:
    try:
        table = pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as exc:
        delimiter = _foreign_delimiter(path)
        if delimiter:
            raise _wrong_delimiter(shown, delimiter) from None
        if "utf8" in str(exc).lower():
            raise _not_utf8(shown, "some text") from None
        raise UserError(f"data.source: cannot read CSV file '{shown}' ({exc}); fix the file") from None
    _check_csv_columns(path, shown, table.schema)
    return table


def _check_csv_columns(path: Path, shown: str, schema: pa.Schema) -> None:
    """What a CSV file's parse accepts and raylens does not: a header or a column that is not
    UTF-8, a file of one column whose header holds another delimiter."""
    try:
        names = schema.names
    except UnicodeDecodeError:
        # Arrow keeps the header's bytes as they are; turning them into names is what fails.
        raise _not_utf8(shown, "its header row") from None
    # Arrow reads a column whose text is not valid UTF-8 as raw bytes instead of failing.
    binary = [
        name
        for name, field in zip(names, schema, strict=True)
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
    ]
    if binary:
        raise _not_utf8(shown, f"column '{binary[0]}'")
    if len(names) == 1:
        delimiter = _foreign_delimiter(path)
        if delimiter:
            raise _wrong_delimiter(shown, delimiter)


def _foreign_delimiter(path: Path) -> str | None:
    """';' or a tab when the header line holds one of them and no comma, else None."""
    try:
        with path.open("rb") as handle:
            header = handle.readline(1 << 16).decode("utf-8", errors="replace")
    except OSError:
        return None  # the caller reports why the file cannot be read
    if "," in header:
        return None
    return next((d for d in (";", "\t") if d in header), None)


def _wrong_delimiter(shown: str, delimiter: str, where: str = "data.source") -> UserError:
    name = "tab" if delimiter == "\t" else f"'{delimiter}'"
    return UserError(
        f"{where}: CSV file '{shown}' seems to use {name} as its delimiter (its header reads as one "
        "column); raylens reads comma-separated CSV: save the file again with ',' between values"
    )


def _not_utf8(shown: str, part: str, where: str = "data.source") -> UserError:
    return UserError(
        f"{where}: CSV file '{shown}' is not UTF-8 text ({part} holds bytes that are not valid "
        "UTF-8); save it again with UTF-8 encoding"
    )


def _unified(schemas: list[tuple[str, pa.Schema]], uri: str) -> pa.Schema:
    """The schema of one table of the files' rows; a column's type may widen (int64 and double
    give double), a column some files lack is null there."""
    if len(schemas) == 1:
        return schemas[0][1]
    for shown, schema in schemas:
        duplicated = sorted({c for c in schema.names if schema.names.count(c) > 1})
        if duplicated:
            raise UserError(
                f"data.source: file '{shown}' in '{uri}' has more than one column named "
                f"{', '.join(repr(c) for c in duplicated)}; rename the columns so each name is unique"
            )
    try:
        return pa.unify_schemas([schema for _, schema in schemas], promote_options="permissive")
    except pa.ArrowException as exc:
        conflict = _type_conflict(schemas)
        if conflict is None:
            raise UserError(
                f"data.source: cannot combine the files in '{uri}' ({exc}); make their columns agree"
            ) from None
        column, (first, first_type), (other, other_type) = conflict
        raise UserError(
            f"data.source: the files in '{uri}' disagree on the type of column '{column}': "
            f"{first_type} in '{first}' but {other_type} in '{other}'; make the column hold the same "
            "kind of values in every file (for numbers, leave missing cells empty instead of writing text "
            "like 'unknown')"
        ) from None


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` in the unified ``schema``: its columns cast to the widened types, in order, a
    column its file lacks all null."""
    if batch.schema.equals(schema):
        return batch
    names = batch.schema.names
    columns = [
        batch.column(field.name).cast(field.type)
        if field.name in names
        else pa.nulls(batch.num_rows, field.type)
        for field in schema
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _type_conflict(
    schemas: list[tuple[str, pa.Schema]],
) -> tuple[str, tuple[str, pa.DataType], tuple[str, pa.DataType]] | None:
    """The first column whose type in some file cannot be combined with its type in an earlier one."""
    seen: dict[str, tuple[str, pa.DataType]] = {}
    for shown, schema in schemas:
        for field in schema:
            if pa.types.is_null(field.type):
                continue  # an all-empty column takes any other file's type
            if field.name not in seen:
                seen[field.name] = (shown, field.type)
                continue
            first_type = seen[field.name][1]
            try:
                pa.unify_schemas(
                    [pa.schema([(field.name, first_type)]), pa.schema([field])], promote_options="permissive"
                )
            except pa.ArrowException:
                return field.name, seen[field.name], (shown, field.type)
    return None


def _fingerprint_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()
