"""The offline store: versioned feature sets as Parquet, one folder per version.

Layout::

    <root>/<feature set name>/<version>/{train,valid,test}.parquet
    <root>/<feature set name>/<version>/manifest.json

A version id is the content hash of the rows and the fitted transforms, so the same data and spec
always give the same version, and a version never changes once written. A version folder without
a manifest is not published: readers skip it, writers replace it.

The store is a folder on a local or network file system or on object storage
(``raylens.storage``). Writes are atomic either way. On a file system, the version is written into
a hidden folder beside it and published with one ``rename``; a crash leaves only a hidden folder
that readers never list and that the next writer on the same host removes. Object storage has no
rename: the splits are written into the version's folder and the manifest, written last, publishes
it (an object appears whole or not at all).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylens.errors import UserError, did_you_mean
from raylens.features.manifest import Manifest
from raylens.storage import Location

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"
"""The source rows data validation set aside, with the reason of each (``raylens.features.validation``)."""
TARGET = "__target__"
"""Column holding the encoded target in stored splits, so it never clashes with a feature name."""
ENTITY, TIME, ROW = "__entity__", "__time__", "__row__"
"""Columns kept beside the features where the spec names an entity: its id, the row's time (with
a time split) and its row number in the source; the online store reads them."""
RAW_PREFIX = "__raw__:"
"""Beside those, ``__raw__:<column>``: the source's own values of each encoded column."""


@dataclass(frozen=True)
class SplitArrays:
    x: np.ndarray
    y: np.ndarray
    keys: Mapping[str, np.ndarray] | None = None
    """``ENTITY``, ``ROW`` (and ``TIME``) of each row, where the spec names an entity."""

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FeatureSet:
    """A handle to one stored feature-set version: cheap to pass to trials and workers."""

    path: Location
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def feature_columns(self) -> list[str]:
        return list(self.manifest.feature_columns)

    @property
    def classes(self) -> list[Any] | None:
        return self.manifest.classes

    @property
    def num_outputs(self) -> int:
        return self.manifest.num_outputs

    def read(self, split: str) -> SplitArrays:
        """Read one split as a float32 feature matrix and the encoded target (memory-mapped)."""
        file = self.path / f"{split}.parquet"
        if self.path.local:
            table = pq.read_table(file.path, memory_map=True)
        else:
            table = pq.read_table(file.path, filesystem=file.filesystem)
        columns = [table.column(c).to_numpy() for c in self.feature_columns]
        x = np.stack(columns, axis=1).astype(np.float32, copy=False) if columns else np.empty((0, 0))
        return SplitArrays(np.ascontiguousarray(x), table.column(TARGET).to_numpy())

    def read_head(self, split: str, rows: int) -> np.ndarray:
        """The first ``rows`` rows of one split's features (fewer if it is shorter), float32,
        without reading the rest."""
        file = self.path / f"{split}.parquet"
        parquet = pq.ParquetFile(file.path, filesystem=None if self.path.local else file.filesystem)
        first = next(parquet.iter_batches(batch_size=max(rows, 1), columns=self.feature_columns), None)
        if first is None:
            return np.empty((0, len(self.feature_columns)), dtype=np.float32)
        return np.stack([first.column(c).to_numpy() for c in self.feature_columns], axis=1).astype(np.float32)

    def read_targets(self, split: str) -> np.ndarray:
        """One split's encoded targets alone (a number per row)."""
        file = self.path / f"{split}.parquet"
        if self.path.local:
            return pq.read_table(file.path, columns=[TARGET]).column(TARGET).to_numpy()
        return (
            pq.read_table(file.path, columns=[TARGET], filesystem=file.filesystem).column(TARGET).to_numpy()
        )

    def read_quarantined(self) -> pa.Table | None:
        """The source rows data validation set aside, with their reasons (None: none were)."""
        if not self.manifest.quarantined:
            return None
        file = self.path / QUARANTINE
        if self.path.local:
            return pq.read_table(file.path)
        return pq.read_table(file.path, filesystem=file.filesystem)

    def read_keys(self, split: str) -> pa.Table:
        """The entity, row number (and time) columns of one split, the source's values of its
        encoded columns, and its feature columns."""
        file = self.path / f"{split}.parquet"
        stored = self._stored_columns(split)
        keys = [c for c in (ENTITY, TIME, ROW) if c in stored] + [
            c for c in stored if c.startswith(RAW_PREFIX)
        ]
        columns = keys + self.feature_columns
        if self.path.local:
            return pq.read_table(file.path, columns=columns, memory_map=True)
        return pq.read_table(file.path, columns=columns, filesystem=file.filesystem)

    def _stored_columns(self, split: str) -> list[str]:
        file = self.path / f"{split}.parquet"
        if self.path.local:
            return list(pq.read_schema(file.path).names)
        return list(pq.read_schema(file.path, filesystem=file.filesystem).names)


def versioned_manifest(manifest: Manifest, splits: Mapping[str, SplitArrays]) -> Manifest:
    """``manifest`` with ``version`` (the content hash) and ``rows`` set: exactly what is stored.

    Computed once, when a feature set is planned, so the version a caller sees before publishing is
    the one the store uses.
    """
    rows = {split: len(splits[split]) for split in SPLITS}
    return manifest.model_copy(update={"version": content_version(manifest, splits), "rows": rows})


def write_feature_set(
    root: Path | str | Location,
    manifest: Manifest,
    feature_columns: list[str],
    splits: Mapping[str, SplitArrays],
    quarantined: pa.Table | None = None,
) -> FeatureSet:
    """Store ``splits`` (and the rows validation set aside) under ``manifest.version`` and return
    its handle.

    ``manifest`` comes from ``versioned_manifest`` and is written as given. Writing a version that
    already exists is a no-op that returns the stored one.
    """
    if not manifest.version or not manifest.rows:
        raise ValueError("write_feature_set takes a manifest from versioned_manifest (with version and rows)")
    name, version = manifest.name, manifest.version
    store = Location.of(root)
    if (store / name / version / MANIFEST).is_file():
        return open_feature_set(store, name, version)
    if not store.local:
        _write_by_manifest_last(store / name / version, manifest, feature_columns, splits, quarantined)
        return open_feature_set(store, name, version)
    target_dir = store.local_path / name / version
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(target_dir.parent)
    staging = target_dir.parent / _staging_name(version)
    staging.mkdir()
    try:
        for split in SPLITS:
            path = staging / f"{split}.parquet"
            _write_split(splits[split], feature_columns, str(path))
            _fsync(path)
        if quarantined is not None:
            pq.write_table(quarantined, staging / QUARANTINE)
            _fsync(staging / QUARANTINE)
        (staging / MANIFEST).write_text(manifest.to_json())
        _fsync(staging / MANIFEST)
        _fsync_dir(staging)
        _publish(staging, target_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return open_feature_set(store, name, version)


WRITE_ROWS = 131_072
"""Rows written at once (one Parquet row group): a column of the matrix is copied out for Arrow a
slice at a time, never the whole split beside itself."""


def _split_table(arrays: SplitArrays, feature_columns: list[str], rows: slice = slice(None)) -> pa.Table:
    x = arrays.x[rows]
    columns = {column: pa.array(np.ascontiguousarray(x[:, i])) for i, column in enumerate(feature_columns)}
    columns[TARGET] = pa.array(arrays.y[rows])
    for name, values in (arrays.keys or {}).items():
        columns[name] = pa.array(values[rows])
    return pa.table(columns)


def _write_split(
    arrays: SplitArrays, feature_columns: list[str], path: str, filesystem: Any | None = None
) -> None:
    first = _split_table(arrays, feature_columns, slice(0, WRITE_ROWS))
    with pq.ParquetWriter(path, first.schema, filesystem=filesystem) as writer:
        writer.write_table(first)
        for start in range(WRITE_ROWS, len(arrays.y), WRITE_ROWS):
            writer.write_table(_split_table(arrays, feature_columns, slice(start, start + WRITE_ROWS)))


def _write_by_manifest_last(
    target: Location,
    manifest: Manifest,
    feature_columns: list[str],
    splits: Mapping[str, SplitArrays],
    quarantined: pa.Table | None = None,
) -> None:
    """Publish on object storage: the splits first (replacing what an unpublished attempt left),
    then the manifest. Writers of the same version write the same bytes, so a race is harmless;
    a crash before the manifest leaves a version that readers skip and the next writer replaces."""
    target.mkdir()
    for split in SPLITS:
        file = target / f"{split}.parquet"
        _write_split(splits[split], feature_columns, file.path, file.filesystem)
    if quarantined is not None:
        file = target / QUARANTINE
        pq.write_table(quarantined, file.path, filesystem=file.filesystem)
    (target / MANIFEST).write_text(manifest.to_json())


def _publish(staging: Path, target_dir: Path) -> None:
    """Rename ``staging`` to ``target_dir`` and make the rename durable."""
    if _exists(target_dir) and not (target_dir / MANIFEST).exists():
        # A version folder without a manifest was never published by us (publishing is one rename
        # of a folder that already holds its manifest): it is a crashed copy or a user's half
        # deletion, so it holds nothing to keep.
        _remove(target_dir)
    try:
        os.rename(staging, target_dir)
    except OSError as exc:
        # Another writer published the same content-addressed version first: theirs is ours.
        if not (target_dir / MANIFEST).exists():
            raise UserError(
                f"feature store: cannot publish {target_dir} ({exc.strerror or exc}); a folder there "
                f"without {MANIFEST} is not a published version: remove it by hand and build again"
            ) from exc
        shutil.rmtree(staging, ignore_errors=True)
        return
    # The rename lives in the parent folder's entries: without this fsync a power cut can undo it.
    _fsync_dir(target_dir.parent)


def _staging_name(version: str) -> str:
    """``.staging-<host>-<pid>-<version>-<random>``: the host and pid let a later writer tell a
    crashed writer's folder from a live one's."""
    return f".staging-{_host()}-{os.getpid()}-{version}-{uuid.uuid4().hex[:8]}"


def _staging_owner(folder_name: str) -> tuple[str, int] | None:
    """The (host, pid) in a staging folder's name, or None for any other name."""
    if not folder_name.startswith(".staging-"):
        return None
    # Split from the right: host names may hold '-', the pid, version and random part never do.
    parts = folder_name.removeprefix(".staging-").rsplit("-", 3)
    if len(parts) != 4 or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _remove_dead_staging(folder: Path) -> None:
    """Remove staging folders left in ``folder`` by crashed writers on this host.

    Only this host's folders are judged: a pid means nothing on another host, whose writer may be
    alive, so those are never touched.
    """
    host = _host()
    for entry in folder.iterdir():
        owner = _staging_owner(entry.name)
        if owner is not None and owner[0] == host and not _pid_alive(owner[1]):
            shutil.rmtree(entry, ignore_errors=True)


def _host() -> str:
    # Keep the name safe in a folder name; '-' stays, the owner is parsed from the right.
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    # Best effort: if it stays (permissions, a concurrent remover), the rename says why.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def content_version(manifest: Manifest, splits: Mapping[str, SplitArrays]) -> str:
    """Hash of the stored rows and of every manifest field that changes what a model sees."""
    digest = hashlib.sha256()
    digest.update(json.dumps(manifest.hashed(), sort_keys=True).encode())
    for split in SPLITS:
        digest.update(split.encode())
        x = splits[split].x
        for start in range(0, len(x), WRITE_ROWS):  # the same bytes as the whole, a slice at a time
            digest.update(np.ascontiguousarray(x[start : start + WRITE_ROWS]).data)
        digest.update(np.ascontiguousarray(splits[split].y).data)
        for name, values in sorted((splits[split].keys or {}).items()):
            digest.update(name.encode())
            if values.dtype.kind in "biuf":
                digest.update(np.ascontiguousarray(values).tobytes())
            else:  # ids as text
                digest.update("\x00".join(map(str, values.tolist())).encode())
    return digest.hexdigest()[:16]


def list_feature_sets(root: Path | str | Location, name: str | None = None) -> list[FeatureSet]:
    """Every published version under ``root`` (of ``name`` if given), oldest first.

    Folders that are not a published version (no manifest, an unreadable one, a stray file) are
    skipped, never raised on: listing must work on a store a crash or a user left untidy.
    """
    store = Location.of(root)
    sets = [store / name] if name else store.folders()
    found = []
    for folder in sets:
        for version_dir in folder.folders():
            if version_dir.name.startswith("."):
                continue
            manifest = _read_manifest(version_dir)
            if manifest is not None:
                found.append(FeatureSet(version_dir, manifest))
    return sorted(found, key=lambda fs: (fs.name, fs.manifest.created_at))


def open_feature_set(root: Path | str | Location, name: str, version: str) -> FeatureSet:
    root = Location.of(root)
    folder = root / name / version
    if not (folder / MANIFEST).is_file():
        known = [fs.version for fs in list_feature_sets(root, name)]
        raise UserError(
            f"feature set '{name}' has no version '{version}'{did_you_mean(version, known)}; "
            f"stored versions: {', '.join(known) or 'none'} (see `raylens features list`)"
        )
    manifest = _read_manifest(folder)
    if manifest is None:
        raise UserError(
            f"feature set '{name}' version '{version}': {folder / MANIFEST} is not a readable manifest; "
            f"remove the folder {folder} and build the feature set again"
        )
    return FeatureSet(folder, manifest)


def _read_manifest(version_dir: Location) -> Manifest | None:
    """The manifest in ``version_dir``, or None when it is missing, unreadable or not a manifest."""
    try:
        return Manifest.from_json((version_dir / MANIFEST).read_text())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a folder's entries (a rename, new files); a filesystem that cannot fsync a folder
    (EINVAL on some network and FUSE mounts) gives no stronger promise, so that is not an error."""
    try:
        _fsync(path)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
