"""Semi-supervised fine-tuning, or the same network trained from scratch.

Network: encoder + the first model.ft_proj_selector projection-head layers of
the source run + a new linear classifier (Chen et al. 2020b, Section 2:
fine-tuning from a middle layer of the projection head). Trains on
finetune.label_fraction of the training labels (ImageNet: the TFDS 1pct /
10pct subsets; others: a seeded, class-stratified subset).
"""

import jax
import ml_collections

from simclr_jax.config import downstream as dcfg
from simclr_jax.data import datasets
from simclr_jax.downstream import common
from simclr_jax.models import classifier
from simclr_jax.models import encoders
from simclr_jax.training import state as state_lib
from simclr_jax.training import supervised


def run_finetune(config: ml_collections.ConfigDict, workdir: str, *,
                 stop_after_steps: int | None = None) -> dict:
  """Fine-tunes (or resumes fine-tuning); returns results.json."""
  f = config.finetune
  src_config, src_vars, src_step = common.load_source(config)
  dcfg.check_finetune(config, common.head_layers_in(src_vars['params']))
  head_layers = config.model.ft_proj_selector
  num_classes = datasets.dataset_info(config).num_classes
  # A wholly frozen encoder (block 4) runs in inference mode, as in linear
  # evaluation; a partly frozen one keeps BN in training mode throughout.
  model = classifier.build_classifier(
      src_config, head_layers=head_layers, num_classes=num_classes,
      frozen_encoder=f.fine_tune_after_block == 4)
  variables = common.init_variables(
      model, config, jax.random.key(config.seed),
      None if f.from_scratch else src_vars)
  frozen = supervised.frozen_mask(
      variables['params'], f.fine_tune_after_block,
      block_of=encoders.fine_tune_block(src_config.model,
                                        src_config.dataset.image_size))
  data = common.train_data(config, f, fraction=f.label_fraction,
                           label_seed=f.label_seed)
  recorded = dcfg.recorded_config(
      config, src_config, head_layers=head_layers, mode='finetune',
      label_fraction=f.label_fraction, label_seed=f.label_seed,
      from_scratch=f.from_scratch,
      fine_tune_after_block=f.fine_tune_after_block)
  fit = common.train_classifier(
      config, 'finetune', workdir, model, variables, frozen,
      supervised.classification_loss_fn(), data, recorded,
      name='finetune(scratch)' if f.from_scratch else 'finetune',
      stop_after_steps=stop_after_steps)
  results = dict(
      common.summary(config, 'finetune', src_step, fit), **data.details,
      num_train_examples=data.num_examples, label_fraction=f.label_fraction,
      label_seed=f.label_seed, from_scratch=f.from_scratch,
      ft_proj_selector=head_layers,
      fine_tune_after_block=f.fine_tune_after_block)
  if not fit.interrupted:
    results.update(common.accuracies(*common.test_logits(
        config, model, state_lib.variables_of(fit.state))))
  return results
