"""SimCLRv2 self-training: a student learns the teacher's soft labels.

The teacher (config.init_from, a fine-tuning run) labels every training
image, unlabelled included, as it is augmented for the student; the student
(config.model's ResNet with no head layers, from random init) minimises
supervised.distill_loss_fn (Chen et al. 2020b, Section 2, eq. 2). With
distill.labelled_weight > 0 the labels of the teacher's own labelled subset
are mixed in (eq. 3).
"""

import jax
import ml_collections
import numpy as np

from simclr_jax.config import downstream as dcfg
from simclr_jax.data import labelled
from simclr_jax.data import pipeline
from simclr_jax.downstream import common
from simclr_jax.models import classifier
from simclr_jax.training import state as state_lib
from simclr_jax.training import supervised


def _load_teacher(config):
  """(model, variables, config, step) of the fine-tuned teacher run."""
  t_config, t_vars, t_step = common.load_source(config)
  params = t_vars['params']
  if 'classifier' not in params:
    raise ValueError(f'config.init_from={config.init_from!r} has no '
                     'classifier: distill needs a fine-tuned teacher, so run '
                     '--mode=finetune first and pass its workdir')
  num_classes = params['classifier']['dense']['kernel'].shape[-1]
  model = classifier.build_classifier(
      t_config, head_layers=common.head_layers_in(params),
      num_classes=num_classes)
  return model, t_vars, t_config, t_step


def run_distill(config: ml_collections.ConfigDict, workdir: str, *,
                stop_after_steps: int | None = None) -> dict:
  """Distils (or resumes distilling) the teacher; returns results.json."""
  dcfg.check_distill(config)
  d = config.distill
  teacher, t_vars, t_config, t_step = _load_teacher(config)
  student = classifier.build_classifier(config, head_layers=0,
                                        num_classes=teacher.num_classes)
  variables = common.init_variables(student, config,
                                    jax.random.key(config.seed), None)
  frozen = supervised.frozen_mask(variables['params'])
  label_rows = None
  if d.labelled_weight > 0:
    info = t_config.get('downstream', {})
    _, labels = pipeline.load_train_arrays_raw(config)
    label_rows = labelled.label_subset(
        labels, info.get('label_fraction', 1.0), info.get('label_seed', 0))
  data = common.train_data(config, d, label_rows=label_rows)
  recorded = dcfg.recorded_config(
      config, config, head_layers=0, mode='distill',
      teacher=config.init_from, temperature=d.temperature)
  fit = common.train_classifier(
      config, 'distill', workdir, student, variables, frozen,
      supervised.distill_loss_fn(d.temperature, d.labelled_weight), data,
      recorded, teacher=teacher, teacher_variables=t_vars,
      stop_after_steps=stop_after_steps)
  results = dict(
      common.summary(config, 'distill', t_step, fit), **data.details,
      num_train_examples=data.num_examples, temperature=d.temperature,
      labelled_weight=d.labelled_weight, student_depth=config.model.depth,
      student_width_multiplier=config.model.width_multiplier)
  if fit.interrupted:
    return results
  s_logits, labels = common.test_logits(config, student,
                                        state_lib.variables_of(fit.state))
  t_logits, _ = common.test_logits(config, teacher, t_vars)
  teacher_acc = common.accuracies(t_logits, labels)
  results.update(
      common.accuracies(s_logits, labels),
      teacher_top1_accuracy=teacher_acc['top1_accuracy'],
      teacher_top5_accuracy=teacher_acc['top5_accuracy'],
      agreement=float(np.mean(np.argmax(s_logits, -1) ==
                              np.argmax(t_logits, -1))))
  return results
