"""Workdir paths: local, or any scheme etils.epath supports (gs://, s3://).

Every read and write of a workdir goes through `epath.Path`, so
`--workdir=gs://bucket/run` names one directory shared by all hosts of a
Cloud TPU pod (what Orbax needs) rather than a local 'gs:/bucket/run' on each
host. Local paths behave as they do with `os` and `open()`.
"""

from __future__ import annotations

import os

from etils import epath


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on the local file system (not a 'scheme://' URI)."""
  return '://' not in os.fspath(path)


def abspath(path: epath.PathLike) -> str:
  """`os.path.abspath` for local paths; URIs (gs://...) are returned as is."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """Writes `text` so that concurrent readers never see a partial file.

  Locally: a temporary file renamed over `path`. Object stores (GCS) make an
  object visible only once its upload completes, so one write suffices.
  """
  path = epath.Path(path)
  if is_local(path):
    tmp = epath.Path(f'{path}.tmp')
    tmp.write_text(text)
    tmp.replace(path)
  else:
    path.write_text(text)


def append_text(path: epath.PathLike, text: str) -> None:
  """Appends `text` to the file at `path`, creating it if needed.

  Object stores (GCS) cannot append to an object: there the object is read
  and rewritten whole, which suits small logs written now and then.
  """
  path = epath.Path(path)
  if is_local(path):
    with path.open('a') as f:
      f.write(text)
  else:
    old = path.read_text() if path.exists() else ''
    path.write_text(old + text)
