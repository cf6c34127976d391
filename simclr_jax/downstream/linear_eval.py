"""Linear evaluation: a linear classifier on the frozen encoder.

The encoder runs in inference mode behind stop_gradient and gets no update;
a linear classifier on its output h is trained with Nesterov momentum SGD on
crop + flip views of every training label (Chen et al. 2020a, Appendix B.6;
docs/algorithms.md#evaluation-protocols). The main job's fast read-outs
(logistic probe, few-shot probes, kNN) of the same features come alongside.
"""

import time

import jax
import ml_collections

from simclr_jax.config import downstream as dcfg
from simclr_jax.data import datasets
from simclr_jax.downstream import common
from simclr_jax.evaluation import readout
from simclr_jax.models import classifier
from simclr_jax.runtime import parallel
from simclr_jax.training import state as state_lib
from simclr_jax.training import supervised


def run_linear_eval(config: ml_collections.ConfigDict, workdir: str, *,
                    stop_after_steps: int | None = None) -> dict:
  """Trains (or resumes) the linear classifier; returns results.json."""
  src_config, src_vars, src_step = common.load_source(config)
  num_classes = datasets.dataset_info(config).num_classes
  model = classifier.build_classifier(src_config, head_layers=0,
                                      num_classes=num_classes,
                                      frozen_encoder=True)
  variables = common.init_variables(model, config,
                                    jax.random.key(config.seed), src_vars)
  frozen = supervised.frozen_mask(variables['params'], frozen_encoder=True)
  data = common.train_data(config, config.linear_eval)
  recorded = dcfg.recorded_config(config, src_config, head_layers=0,
                                  mode='linear_eval', label_fraction=1.0,
                                  label_seed=0)
  fit = common.train_classifier(
      config, 'linear_eval', workdir, model, variables, frozen,
      supervised.classification_loss_fn(), data, recorded,
      stop_after_steps=stop_after_steps)
  results = dict(common.summary(config, 'linear_eval', src_step, fit),
                 **data.details, num_train_examples=data.num_examples)
  if fit.interrupted:
    return results
  trained = state_lib.variables_of(fit.state)
  results.update(common.accuracies(*common.test_logits(config, model,
                                                       trained)))
  if config.linear_eval.fast_probe:
    results['fast_probe'] = _fast_probe(config, model, trained)
  return results


def _fast_probe(config, model, variables) -> dict:
  """The main job's read-outs (evaluation.evaluate_features) of h.

  Features are taken from the streamed splits (at most
  linear_eval.probe_max_examples each), never from whole image arrays.
  """
  limit = config.linear_eval.probe_max_examples or None
  mesh = parallel.make_mesh()
  apply = readout.feature_fn(model)
  t0 = time.time()
  train, test = (readout.featurize_split(
      apply, variables, config, split, batch_size=config.eval.batch_size,
      mesh=mesh, max_examples=limit,
      gather_max_bytes=config.eval.feature_gather_max_bytes)
                 for split in (config.dataset.train_split,
                               config.dataset.eval_split))
  out = readout.evaluate_frozen(train, test, eval_config=config.eval,
                                seed=config.seed, mesh=mesh)
  out['wall_time_s'] = time.time() - t0
  return out
