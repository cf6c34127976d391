"""Preflight: the plan of a run on a target machine, from the config alone.

Three plans of the tiny digits recipe (ResNet-18 at width 1/8, 16 px), each
compiled on one CPU device for 8 target devices: 8 images per device with a
budget nothing fits in, 16 per device plain, and 16 per device in chunks of
4 (gradient caching asked for through max_batch_per_device).
"""

import os
import subprocess
import sys

import pytest

from conftest import TINY_RECIPE

from simclr_jax.config import defaults
from simclr_jax.tools import preflight

RECIPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')
DEVICES = 8
STAGES = ('train step', 'eval forward', 'host input pipeline',
          'host evaluation features', 'checkpoint')


def _tiny(per_device: int, **fields):
  c = defaults.load_recipe(os.path.join(RECIPES, 'digits.py'), 'tiny')
  c.batch_size = per_device * DEVICES
  c.eval.batch_size = 8 * DEVICES
  for key, value in fields.items():
    c[key] = value
  return c


@pytest.fixture(scope='module')
def refused():
  with pytest.raises(preflight.PlanError) as err:
    preflight.preflight(_tiny(8), devices=DEVICES, device_memory_gb=0.001,
                        hosts=2)
  return err.value


@pytest.fixture(scope='module')
def plain16():
  return preflight.preflight(_tiny(16), devices=DEVICES, device_memory_gb=1,
                             hosts=2)


@pytest.fixture(scope='module')
def chunked16():
  return preflight.preflight(_tiny(16, max_batch_per_device=4),
                             devices=DEVICES, device_memory_gb=1, hosts=2)


def test_over_budget_is_refused_in_one_line_naming_stage_and_field(refused):
  message = str(refused)
  assert '\n' not in message
  assert "'train step'" in message
  assert 'max_batch_per_device' in message
  assert refused.plan is not None and not refused.plan['fits']


def test_table_has_every_stage_and_the_step_counts(refused):
  plan = refused.plan
  table = preflight.format_table(plan)
  for stage in STAGES:
    assert f'| {stage} |' in table
  assert plan['per_device_batch'] == 8 and plan['per_host_batch'] == 32
  # The digits train split (1,437 images) read from its metadata.
  assert plan['num_train_examples'] == 1437
  assert plan['steps_per_epoch'] == 1437 // 64
  assert f"{plan['steps_per_epoch']:,} steps/epoch" in table
  assert f"{plan['total_steps']:,} total steps" in table
  assert 'dataset metadata' in table
  by_name = {s['stage']: s for s in plan['stages']}
  assert by_name['checkpoint']['bytes'] > 0
  assert by_name['host evaluation features']['bytes'] == (
      (plan['num_train_examples'] + plan['num_eval_examples']) *
      plan['feature_width'] * 4)


def test_host_features_over_the_budget_are_a_hosts_share():
  c = defaults.base_config()
  c.eval.batch_size = 1024
  # ImageNet's training split at ResNet-50's width on 128 devices / 16
  # hosts: 1,252 batches of 1,024 (the last one padded), 64 rows of each on
  # a host, instead of all 1,281,167 rows on every host.
  held, spread = preflight._host_feature_bytes(c, 1_281_167, 2048, 128, 16)
  assert spread and held == 1252 * 64 * 2048 * 4
  assert held < 1_281_167 * 2048 * 4 / 15
  # Its validation split (400 MB) is under the 1 GiB default: whole.
  assert preflight._host_feature_bytes(c, 50_000, 2048, 128, 16) == (
      50_000 * 2048 * 4, False)
  c.eval.feature_gather_max_bytes = 0
  assert preflight._host_feature_bytes(c, 50_000, 2048, 128, 16) == (
      49 * 64 * 2048 * 4, True)


def test_train_step_memory_grows_with_the_per_device_batch(refused,
                                                           plain16):
  small = {p['program']: p for p in refused.plan['programs']}['step']
  large = {p['program']: p for p in plain16['programs']}['step']
  assert large['temp'] > small['temp']
  train = lambda plan: plan['stages'][0]['bytes']
  assert train(plain16) > train(refused.plan)


def test_gradient_caching_lowers_the_train_step_peak(plain16, chunked16):
  assert plain16['grad_cache_chunks'] == 0
  assert chunked16['grad_cache_chunks'] == 4  # 16 per device, 4 at a time.
  table = preflight.format_table(chunked16)
  for program in ('forward', 'loss', 'backward', 'update'):
    assert f'| grad-cache {program} |' in table
  assert chunked16['stages'][0]['bytes'] < plain16['stages'][0]['bytes']


def test_known_sizes_without_metadata():
  c = defaults.load_recipe(os.path.join(RECIPES, 'imagenet_resnet50.py'))
  c.dataset.data_dir = '/nonexistent'
  sizes = preflight.dataset_sizes(c)
  assert (sizes.num_train, sizes.num_eval, sizes.num_classes) == (
      1_281_167, 50_000, 1000)
  assert sizes.source in ('known size (TFDS catalogue)', 'dataset metadata')
  given = preflight.dataset_sizes(c, num_train_examples=1000)
  assert given.num_train == 1000 and 'argument' in given.source
  c.dataset.train_split = 'train[:50%]'
  assert preflight.dataset_sizes(c).num_train == 1_281_167 // 2


def test_devices_must_spread_over_hosts():
  with pytest.raises(preflight.PlanError, match='hosts'):
    preflight.preflight(_tiny(8), devices=DEVICES, device_memory_gb=1,
                        hosts=3)


def test_main_preflight_refuses_in_one_line_and_trains_nothing(tmp_path):
  """`main --preflight` on the command line: the table, then one `error:`
  line and exit status 2 for a plan over budget; no workdir is written."""
  workdir = tmp_path / 'never'
  r = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main',
       f'--config={TINY_RECIPE}', f'--workdir={workdir}',
       '--preflight', f'--preflight_devices={DEVICES}',
       '--preflight_device_memory_gb=0.001'],
      capture_output=True, text=True, timeout=600, check=False,
      cwd=os.path.dirname(RECIPES))
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: preflight: stage 'train step' needs"), last
  assert 'config.max_batch_per_device' in last
  assert '| train step | device |' in r.stdout
  assert not workdir.exists()
