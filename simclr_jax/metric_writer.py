"""Scalar metrics to JSON lines and, when TensorFlow is present, TensorBoard.

Only process 0 writes (multi-host runs would otherwise write N copies). The
JSON-lines file is always written so runs without TensorFlow (the on-device
augmentation path) still leave a machine-readable history.
"""

import json
import os
from typing import Mapping

import jax
from absl import logging


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      import tensorboard  # pylint: disable=g-import-not-at-top,unused-import
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], 'GPU')
      self._tf = tf
      self._tb = tf.summary.create_file_writer(
          os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.info('TensorFlow/TensorBoard not installed: no TensorBoard '
                   'summaries, only metrics.jsonl.')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      with self._tb.as_default(step=step):
        for k, v in scalars.items():
          self._tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
