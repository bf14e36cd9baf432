"""Where a run folder lives: a local or network (NFS) path, or object storage (``s3://``,
``gs://``, ``abfs://``, ``hdfs://``), through pyarrow's filesystems — the ones Ray Train and Tune
use for their own ``storage_path``.

A ``Location`` is a folder there. It travels to Ray workers as its URI and finds its filesystem
again on arrival, so credentials come from each node's own environment (``AWS_*``,
``GOOGLE_APPLICATION_CREDENTIALS``, instance roles) and are never pickled, logged or recorded.
Options of the filesystem go in the URI's query, as pyarrow reads them:
``s3://bucket/runs?region=eu-west-1`` or ``?endpoint_override=host:port&scheme=http`` for an
S3-compatible store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylens.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CREDENTIALS = re.compile(
    r"(^|&)(access_key|secret_key|session_token|access_token|credentials|client_secret|account_key|"
    r"sas_token|password|token)=",
    re.I,
)


def is_uri(where: str | os.PathLike[str]) -> bool:
    """Whether ``where`` names object storage (or ``file://``) rather than a plain path."""
    return bool(_SCHEME.match(os.fspath(where)))


def check_uri(where: str) -> None:
    """Refuse credentials in a storage URI (without reaching the storage): in its options, or as
    ``user:secret@`` before the bucket, both of which pyarrow would use."""
    base, _, options = where.partition("?")
    if _CREDENTIALS.search(options) or ":" in base.partition("://")[2].split("/", 1)[0].rpartition("@")[0]:
        raise UserError(
            f"storage '{_without_query(where)}': credentials do not go in the URI, where logs and "
            "Ray's stored state would keep them; set them in the environment (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) on this machine and the cluster's"
        )


@dataclass(frozen=True)
class Location:
    """A folder on a pyarrow filesystem; ``/`` names a child."""

    uri: str
    """As a user writes it: an absolute path, or ``scheme://bucket/key`` with any options after ``?``."""
    path: str
    """The folder's path inside ``filesystem`` (no scheme, no options)."""
    remote_filesystem: pafs.FileSystem | None = field(default=None, compare=False, repr=False)
    """Object storage's filesystem; None on the local file system (made on first use: importing
    pyarrow takes a while, and a spec mistake is answered without it)."""

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        check_uri(text)
        if not is_uri(text):
            local = str(Path(text).expanduser().resolve())
            return cls(local, local)
        import pyarrow.fs as pafs

        try:
            filesystem, path = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(
                f"storage '{_without_query(text)}': {exc}; give a local path or a URI pyarrow reads "
                "(s3://bucket/folder, gs://bucket/folder, hdfs://host/folder)"
            ) from None
        if isinstance(filesystem, pafs.LocalFileSystem):  # file:///path
            return cls.of(path)
        base, _, query = text.partition("?")
        return cls(base.rstrip("/") + (f"?{query}" if query else ""), path.rstrip("/"), filesystem)

    def __truediv__(self, name: str) -> Location:
        path = f"{self.path.rstrip('/')}/{name}"
        if self.local:  # a local path may hold a '?': it has no options
            return Location(path, path)
        base, _, query = self.uri.partition("?")
        return Location(f"{base}/{name}" + (f"?{query}" if query else ""), path, self.remote_filesystem)

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"  # never the options, which name endpoints and the like

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # The filesystem is found again from the URI where it is unpickled: see the module's docstring.
        return (Location.of, (self.uri,))

    def __str__(self) -> str:
        return self.uri if self.local else _without_query(self.uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local(self) -> bool:
        return self.remote_filesystem is None

    @property
    def filesystem(self) -> pafs.FileSystem:
        if self.remote_filesystem is not None:
            return self.remote_filesystem
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    @property
    def local_path(self) -> Path:
        if not self.local:
            raise ValueError(f"{self} is not on the local file system")
        return Path(self.path)

    @property
    def native(self) -> Path | str:
        """What a user opens: a ``Path`` on the local file system, else the URI (without options)."""
        return self.local_path if self.local else str(self)

    def _type(self) -> str:
        return str(self.filesystem.get_file_info(self.path).type.name)

    def exists(self) -> bool:
        return self._type() != "NotFound"

    def is_file(self) -> bool:
        return self._type() == "File"

    def is_dir(self) -> bool:
        return self._type() == "Directory"

    def folders(self) -> list[Location]:
        """The folders directly in this one, by name; none when it does not exist."""
        import pyarrow.fs as pafs

        if not self.is_dir():
            return []
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path))
        return sorted(
            (self / info.base_name for info in found if info.type == pafs.FileType.Directory),
            key=lambda location: location.name,
        )

    def read_text(self) -> str:
        with self.filesystem.open_input_stream(self.path) as stream:
            return bytes(stream.read()).decode()

    def write_text(self, text: str) -> None:
        """Write the whole file; on object storage it appears whole or not at all."""
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode())

    def mkdir(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)


def _without_query(uri: str) -> str:
    # Options and a user part may carry secrets (pyarrow reads keys there): never shown.
    scheme, sep, rest = uri.partition("?")[0].partition("://")
    if not sep:
        return scheme
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"


def check_reachable(location: Location) -> None:
    """On object storage: the bucket exists and this machine's credentials reach it. Said before
    anything is written, as what to fix, rather than as pyarrow's error once writing starts."""
    if location.local:
        return
    bucket = location.path.split("/", 1)[0]
    try:
        found = location.filesystem.get_file_info(bucket).type.name
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"storage '{location}': cannot reach it ({reason}); check this machine's credentials "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) and the "
            "URI's options"
        ) from None
    if found == "NotFound":
        raise UserError(
            f"storage '{location}': there is no bucket '{bucket}' (or these credentials cannot see "
            "it); create it, or give another --runs-dir"
        )


def ray_storage(location: Location) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem``) for Ray's ``RunConfig``, ``Tuner.restore``
    and ``Tuner.can_restore``: the URI's options live in the filesystem, not in the path."""
    if location.local:
        return {"storage_path": location.path}
    return {"storage_path": location.path, "storage_filesystem": location.filesystem}
