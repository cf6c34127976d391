"""Scalar metrics to JSON lines and TensorBoard event files.

Only process 0 writes (multi-host runs would otherwise write N copies). The
JSON-lines file is always written. TensorBoard summaries come from the
`tensorboard` package's own event writer, which needs no TensorFlow, so runs
on the on-device augmentation path (an accelerator machine without
TensorFlow) keep their curves too. Where TensorFlow is installed that writer
uses TF's file system layer (gs:// and other remote paths); without it, local
paths.

The workdir may be local or remote (gs://...; see `paths`). Locally
metrics.jsonl is appended to. Object stores cannot append, so for a remote
workdir the writer keeps the file's lines in memory (read once at start, so a
resumed run keeps its history) and rewrites the whole object on every write;
each write is then as durable as a local flushed append. The file stays small
(one line per logged step), so the rewrite is cheap next to a train step.
"""

import json
import math
import os
import time
from typing import Mapping

import jax
from absl import logging
from etils import epath

from simclr_jax.runtime import paths


def format_eta(seconds: float) -> str:
  """H:MM:SS for the log's ETA; '?' before the rate is known."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._remote_lines = None  # Remote workdir: metrics.jsonl's lines.
    self._tb = None
    if not self.enabled:
      return
    jsonl = epath.Path(workdir) / 'metrics.jsonl'
    if paths.is_local(workdir):
      self._jsonl = jsonl.open('a')
    else:
      self._jsonl_path = jsonl
      self._remote_lines = (
          jsonl.read_text().splitlines(keepends=True) if jsonl.exists()
          else [])
    try:
      # pylint: disable=g-import-not-at-top,unused-import
      import tensorboard  # First: sys.modules['tensorboard'] = None opts out.
      from tensorboard.compat.proto import event_pb2
      from tensorboard.compat.proto import summary_pb2
      from tensorboard.summary.writer import event_file_writer
      # pylint: enable=g-import-not-at-top
      self._pb = (event_pb2, summary_pb2)
      self._tb = event_file_writer.EventFileWriter(
          os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.info('tensorboard not installed: no TensorBoard summaries, '
                   'only metrics.jsonl.')
    except Exception as e:  # pylint: disable=broad-except
      # E.g. a gs:// workdir without TensorFlow's file system layer.
      self._tb = None
      logging.warning('No TensorBoard summaries in %s (%s); metrics.jsonl '
                      'is still written.', workdir, e)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({'step': step, **scalars}) + '\n'
    if self._remote_lines is not None:
      self._remote_lines.append(line)
      self._jsonl_path.write_text(''.join(self._remote_lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      event_pb2, summary_pb2 = self._pb
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=float(v))
          for k, v in scalars.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                         summary=summary))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
