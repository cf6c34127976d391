"""A 2-D picture (PCA or t-SNE) of a run's test-split encoder features.

With embed.target, the test splits of both domains of an adaptation, side
by side coloured by domain and by class, so the alignment can be seen.
"""

import io
import os
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from simclr_jax.config import downstream as dcfg
from simclr_jax.data import datasets
from simclr_jax.data import pipeline
from simclr_jax.downstream import common
from simclr_jax.evaluation import features as features_lib
from simclr_jax.models import encoders
from simclr_jax.models.variables import split_variables
from simclr_jax.runtime import parallel
from simclr_jax.runtime import paths


def run_embed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Projects the features, writes embedding_<method>.png and .npz."""
  from simclr_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  dcfg.check_embed(config)
  e = config.embed
  src_config, src_vars, src_step = common.load_source(config)
  encoder = encoders.build_encoder(src_config.model,
                                   src_config.dataset.image_size)
  variables = split_variables(src_vars, 'encoder')
  mesh = parallel.make_mesh()
  apply = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
  # The eval split of config.dataset, and of embed.target if given (the
  # target of a domain adaptation: one picture of both domains).
  configs = [config]
  if e.target:
    from simclr_jax.downstream import adapt  # pylint: disable=g-import-not-at-top
    configs.append(datasets.with_overrides(
        config, {**adapt.target_dataset(config), 'name': e.target}))
  feats, labels, domains = [], [], []
  for domain, c in enumerate(configs):
    for x, y in pipeline.eval_batches(c, c.dataset.eval_split,
                                      config.eval.batch_size):
      feats.append(features_lib.extract_features(
          apply, x, config.eval.batch_size, mesh, variables=variables))
      labels.append(y)
      domains.append(np.full(len(y), domain))
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  domains = np.concatenate(domains)
  if len(labels) > e.max_points:  # Seeded subsample keeps t-SNE fast.
    keep = np.sort(np.random.default_rng(config.seed).choice(
        len(labels), e.max_points, replace=False))
    feats, labels, domains = feats[keep], labels[keep], domains[keep]
  t0 = time.time()
  points = embedding.project_2d(feats, e.method, seed=config.seed)
  path = os.path.join(workdir, f'embedding_{e.method}.png')
  names = ' and '.join(c.dataset.name for c in configs)
  title = (f'{e.method.upper()} of {names} '
           f'{config.dataset.eval_split} encoder features\n'
           f'{config.init_from} (step {src_step})')
  if jax.process_index() == 0:
    if e.target:
      embedding.plot_domains(points, labels, domains,
                             [c.dataset.name for c in configs], path, title)
    else:
      embedding.plot_embedding(points, labels, path, title)
    buffer = io.BytesIO()  # np.savez needs a seekable file; GCS has none.
    np.savez(buffer, points=points, labels=labels, domains=domains)
    epath.Path(workdir, f'embedding_{e.method}.npz').write_bytes(
        buffer.getvalue())
  return {'mode': 'embed', 'init_from': config.init_from,
          'source_step': src_step, 'method': e.method,
          'num_points': int(len(labels)), 'feature_dim': int(feats.shape[1]),
          'png': paths.abspath(path), 'projection_wall_time_s':
          time.time() - t0}
