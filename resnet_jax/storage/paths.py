"""Run paths: a path string from a flag or a config becomes an `epath.Path` here, and only here.

A local path has `~` expanded and is made absolute; a bucket URI (`gs://`, `s3://`) is kept
as it is. Everything a run reads or writes goes through the returned `epath.Path`, so a
local folder and a bucket behave the same.

Buckets go through fsspec (`gcsfs` for gs://, `s3fs` for s3://). With TensorFlow installed,
etils would send gs:// through TensorFlow's own GCS client instead, which no local emulator
can stand in for; `resnet_jax` sets `EPATH_USE_TF=false` when it is imported (a value the
user set wins), so production takes the path the tests take. tfds still reads a bucket
`data_dir`'s records through TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

from etils import epath

BUCKET_SCHEMES = ("gs://", "s3://")
# What each scheme needs installed, and how to get it.
_FSSPEC_PACKAGES = {"gs://": ("gcsfs", "pip install gcsfs"),
                    "s3://": ("s3fs", "pip install 'resnet-jax[s3]'")}
_GCS_CREDENTIALS_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service-account key file (on a Cloud TPU or GCE VM the VM's service account provides "
    "them); for a local emulator set STORAGE_EMULATOR_HOST")


class StorageError(ValueError):
  """A path that cannot be used: no credentials, no such bucket, not writable."""


def is_bucket(path: str | os.PathLike) -> bool:
  """Whether `path` names an object in a bucket (gs://, s3://) rather than a local file."""
  return os.fspath(path).startswith(BUCKET_SCHEMES)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a bucket URI as it is, a local path with `~` expanded, absolute."""
  text = os.fspath(path)
  if is_bucket(text):
    return epath.Path(text)
  return epath.Path(text).expanduser().absolute()


def _scheme(path: epath.Path) -> str:
  return next(s for s in BUCKET_SCHEMES if os.fspath(path).startswith(s))


def bucket_root(path: epath.Path) -> epath.Path:
  """gs://bucket/a/b → gs://bucket."""
  scheme = _scheme(path)
  return epath.Path(scheme + os.fspath(path)[len(scheme):].split("/", 1)[0])


def _check_gcs_credentials(path: epath.Path, what: str) -> None:
  """StorageError unless Google's default credentials (or an emulator) are configured."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  import google.auth
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError:
    raise StorageError(f"no Google Cloud credentials for {what}={path}: "
                       f"{_GCS_CREDENTIALS_HINT}") from None


def check_bucket(path: epath.Path, what: str, writable: bool = False) -> None:
  """Checks that `path`'s bucket can be reached (and written, with `writable`).

  One StorageError line for each way it can fail: the fsspec package for its scheme is
  missing (naming what to install), no credentials, no such bucket, not writable. `what` is
  the flag or config key that named it. A local path passes unchecked.
  """
  if not is_bucket(path):
    return
  scheme = _scheme(path)
  package, install = _FSSPEC_PACKAGES[scheme]
  try:
    __import__(package)
  except ImportError:
    raise StorageError(f"{what}={path} needs the {package} package for {scheme} paths: "
                       f"{install}") from None
  if scheme == "gs://":
    _check_gcs_credentials(path, what)
  root = bucket_root(path)
  try:
    exists = root.exists()
  except (OSError, ValueError) as e:  # gcsfs raises HttpError (OSError) and ValueError
    raise StorageError(f"cannot reach the bucket of {what}={path}: {error_reason(e)}") from None
  if not exists:
    raise StorageError(f"{what}={path}: the bucket {root} does not exist (or these "
                       f"credentials may not see it); create it first, e.g. `gcloud storage "
                       f"buckets create {root}`")
  if writable:
    probe = path / f".write_check_{uuid.uuid4().hex}"
    try:
      probe.write_text("resnet_jax checks that it may write here")
      probe.unlink()
    except (OSError, ValueError) as e:
      raise StorageError(f"{what}={path} is not writable: {error_reason(e)}") from None


def storage_errors() -> tuple[type[Exception], ...]:
  """What a failed read or write of a local file or a bucket object raises: OSError (gcsfs's
  missing objects and refused connections, s3fs's errors), or gcsfs's HttpError for an HTTP
  status it gave up retrying. (gcsfs is imported here, on first use: it reads its settings
  from the environment when imported.)"""
  from gcsfs.retry import HttpError
  return (OSError, HttpError)


def error_reason(error: Exception) -> str:
  """An OSError's strerror, else the exception's type and the first line of its message
  (storage clients write whole HTTP replies), for an error line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def write_atomically(path: epath.Path, data: str | bytes) -> None:
  """Replaces `path` with `data` so that a reader sees the old or the new file, never a part.

  A bucket object is replaced whole by one upload; a local file through a temporary file
  and a rename.
  """
  target = path if is_bucket(path) else path.with_name(path.name + ".tmp")
  if isinstance(data, bytes):
    target.write_bytes(data)
  else:
    target.write_text(data)
  if target != path:
    target.replace(path)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One file or folder found by `list_tree`."""

  path: str  # the full path or URI, as `resolve` takes it
  is_dir: bool
  size: int
  version: str  # changes when the file does: a bucket object's generation, a file's mtime


def list_tree(directory: epath.Path) -> list[Entry]:
  """Everything below `directory`, recursively, sorted by path.

  One paginated listing in a bucket (sizes and versions included), where `epath` would
  need a request per file for its size.
  """
  import fsspec  # the backend epath uses for buckets; for a local folder, os under the hood
  text = os.fspath(directory)
  fs, root = fsspec.core.url_to_fs(text)
  prefix = text[:len(text) - len(root.rstrip("/"))] if is_bucket(text) else ""
  found = fs.find(root, detail=True, withdirs=True)
  return sorted((Entry(prefix + name.rstrip("/"), info.get("type") == "directory",
                       int(info.get("size") or 0),
                       str(info.get("generation") or info.get("mtime") or ""))
                 for name, info in found.items() if name.rstrip("/") != root.rstrip("/")),
                key=lambda e: e.path)


def move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves the folder `source` to `target` (whose parent must exist, if local).

  Locally one rename. A bucket has no folders to rename: every object is copied, then the
  originals are deleted; cut short, it leaves the source whole (and perhaps a partial copy).
  """
  if not is_bucket(source):
    source.rename(target)
    return
  import fsspec
  fs, _ = fsspec.core.url_to_fs(os.fspath(source))
  fs.copy(os.fspath(source), os.fspath(target), recursive=True)
  fs.rm(os.fspath(source), recursive=True)
