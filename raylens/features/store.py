"""The offline store: versioned feature sets as Parquet, one folder per version.

Layout::

    <root>/<feature set name>/<version>/{train,valid,test}.parquet
    <root>/<feature set name>/<version>/manifest.json

A version id is the content hash of the rows and the fitted transforms, so the same data and spec
always give the same version, and a version never changes once written. Writes are atomic: the
version is written into a hidden folder beside it and published with one ``rename``; a crash
leaves only a hidden folder that readers never list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylens.errors import UserError, did_you_mean

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
TARGET = "__target__"
"""Column holding the encoded target in stored splits, so it never clashes with a feature name."""


@dataclass(frozen=True)
class SplitArrays:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FeatureSet:
    """A handle to one stored feature-set version: cheap to pass to trials and workers."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def feature_columns(self) -> list[str]:
        return list(self.manifest["feature_columns"])

    @property
    def classes(self) -> list[Any] | None:
        return self.manifest.get("classes")

    @property
    def num_outputs(self) -> int:
        classes = self.classes
        return len(classes) if classes is not None else 1

    def read(self, split: str) -> SplitArrays:
        """Read one split as a float32 feature matrix and the encoded target (memory-mapped)."""
        table = pq.read_table(self.path / f"{split}.parquet", memory_map=True)
        columns = [table.column(c).to_numpy() for c in self.feature_columns]
        x = np.stack(columns, axis=1).astype(np.float32, copy=False) if columns else np.empty((0, 0))
        return SplitArrays(np.ascontiguousarray(x), table.column(TARGET).to_numpy())


def write_feature_set(
    root: Path,
    manifest: dict[str, Any],
    feature_columns: list[str],
    splits: dict[str, SplitArrays],
) -> FeatureSet:
    """Store ``splits`` under a content-hash version and return its handle.

    ``manifest`` gets ``version`` and ``rows`` added. Writing a version that already exists is a
    no-op that returns the stored one.
    """
    version = content_version(manifest, splits)
    manifest = {**manifest, "version": version, "rows": {s: len(splits[s]) for s in SPLITS}}
    target_dir = root / manifest["name"] / version
    if (target_dir / MANIFEST).exists():
        return open_feature_set(root, manifest["name"], version)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = target_dir.parent / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for split in SPLITS:
            arrays = splits[split]
            columns = {name: pa.array(arrays.x[:, i]) for i, name in enumerate(feature_columns)}
            columns[TARGET] = pa.array(arrays.y)
            path = staging / f"{split}.parquet"
            pq.write_table(pa.table(columns), path)
            _fsync(path)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync(staging / MANIFEST)
        try:
            os.rename(staging, target_dir)
        except OSError:
            # Another writer published the same content-addressed version first: theirs is ours.
            if not (target_dir / MANIFEST).exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return open_feature_set(root, manifest["name"], version)


def content_version(manifest: dict[str, Any], splits: dict[str, SplitArrays]) -> str:
    """Hash of the stored rows and of every manifest field that changes what a model sees."""
    digest = hashlib.sha256()
    hashed = {k: v for k, v in manifest.items() if k not in ("created_at", "version", "rows", "name")}
    digest.update(json.dumps(hashed, sort_keys=True).encode())
    for split in SPLITS:
        digest.update(split.encode())
        digest.update(np.ascontiguousarray(splits[split].x).tobytes())
        digest.update(np.ascontiguousarray(splits[split].y).tobytes())
    return digest.hexdigest()[:16]


def list_feature_sets(root: Path, name: str | None = None) -> list[FeatureSet]:
    """Every published version under ``root`` (of ``name`` if given), oldest first."""
    names = [name] if name else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    found = []
    for set_name in names:
        folder = root / set_name
        if not folder.is_dir():
            continue
        for version_dir in folder.iterdir():
            if version_dir.name.startswith(".") or not (version_dir / MANIFEST).exists():
                continue
            found.append(FeatureSet(version_dir, json.loads((version_dir / MANIFEST).read_text())))
    return sorted(found, key=lambda fs: (fs.name, fs.manifest.get("created_at", "")))


def open_feature_set(root: Path, name: str, version: str) -> FeatureSet:
    folder = root / name / version
    if not (folder / MANIFEST).exists():
        known = [fs.version for fs in list_feature_sets(root, name)]
        raise UserError(
            f"feature set '{name}' has no version '{version}'{did_you_mean(version, known)}; "
            f"stored versions: {', '.join(known) or 'none'} (see `raylens features list`)"
        )
    return FeatureSet(folder, json.loads((folder / MANIFEST).read_text()))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
