"""Modes that start from another run: linear_eval, finetune, distill, embed,
and adapt (domain adaptation, from a run or from scratch).

  python -m simclr_jax.main --config=configs/digits.py --workdir=DIR \
      --mode=linear_eval|finetune|distill|embed --config.init_from=RUN

`config.init_from` names the --workdir of the run to start from: a
pretraining run for linear_eval/finetune/embed (a fine-tuning run also
works), and the fine-tuned TEACHER run for distill. The architecture always
comes from that run's config.json; dataset and training settings from the
current config (config.linear_eval, .finetune, .distill, .embed).

linear_eval, finetune and distill train through the shared loop
(training/loop.py): periodic checkpoints, resume on re-run, SIGTERM-safe,
metrics.jsonl. Their checkpoints hold params {'encoder', 'projection_head'
(kept layers, if any), 'classifier'}, so `checkpointing.load_run` reads them
and a fine-tuned run can be the teacher of a distillation. Each runner
returns the dict main writes as results.json.
"""

from simclr_jax.downstream.adapt import run_adapt
from simclr_jax.downstream.distill import run_distill
from simclr_jax.downstream.embed import run_embed
from simclr_jax.downstream.finetune import run_finetune
from simclr_jax.downstream.linear_eval import run_linear_eval

# Modes whose runner trains through the loop (and so takes stop_after_steps).
TRAINING_RUNNERS = {'linear_eval': run_linear_eval, 'finetune': run_finetune,
                    'distill': run_distill, 'adapt': run_adapt}
RUNNERS = dict(TRAINING_RUNNERS, embed=run_embed)
