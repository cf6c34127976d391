r"""Host memory of the end-of-run evaluation against the size of the split.

  python -m simclr_jax.tools.eval_memory --out=/tmp/eval_memory \
      --sizes=20000,80000 --image_size=64

Writes one image dataset in TFDS format (`prepare_data`'s records, the
embedded digits cycled to the largest size at `image_size` px), then, for
each size, runs the main job's evaluation (`training/pretrain.
evaluate_encoder`: probes, few-shot probes, kNN, random-init and pixel
baselines) of a tiny encoder on the first `size` training images, each in
its own process, and reads that process's peak resident memory during the
evaluation alone (Linux: the peak is reset through /proc/self/clear_refs
just before it). Streamed evaluation holds features, not images, so the
peak should grow with the split by about the features' size; the JSON line
it prints (and writes to OUT/eval_memory.json) says by how much it did.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _vm_hwm_bytes() -> int:
  """Peak resident set size of this process since the last reset."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  raise RuntimeError('no VmHWM in /proc/self/status')


def _reset_peak() -> None:
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # Resets VmHWM to the current RSS (Linux >= 4.0).


def write_dataset(out: str, num_train: int, num_test: int,
                  image_size: int) -> str:
  """The digits cycled to `num_train` + `num_test` PNGs, prepared as records."""
  from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import folder  # pylint: disable=g-import-not-at-top
  prepared = os.path.join(out, 'records')
  if os.path.exists(os.path.join(prepared, 'dataset_info.json')):
    return prepared
  images, labels = digits.load_digits('train')
  images = np.clip(np.round(digits.resize_bilinear(images, image_size)), 0,
                   255).astype(np.uint8)
  rows = np.arange(num_train + num_test) % len(labels)
  png = os.path.join(out, 'png')
  folder.write_image_folder(png, {
      'train': (images[rows[:num_train]], labels[rows[:num_train]]),
      'test': (images[rows[num_train:]], labels[rows[num_train:]])})
  folder.write_tfrecords(png, prepared)
  return prepared


def measure(prepared: str, num_train: int, num_test: int,
            image_size: int) -> dict:
  """Peak RSS of the evaluation of a tiny encoder on `num_train` images."""
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  c = defaults.load_recipe(os.path.join(root, 'configs', 'digits.py'), 'tiny')
  c.dataset.name = 'folder'
  c.dataset.folder = prepared
  c.dataset.train_split = f'train[:{num_train}]'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = image_size
  c.batch_size = 64
  setup = pretrain.build(c)
  state = jax.device_get(pretrain.initial_state(setup))
  from simclr_jax.evaluation import readout  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  probe = np.zeros((len(setup.mesh.devices.flat), image_size, image_size, 3),
                   np.float32)
  width = int(np.asarray(readout.feature_fn(setup.model)(
      state_lib.variables_of(state), probe)).shape[-1])
  _reset_peak()
  before = _vm_hwm_bytes()
  t0 = time.time()
  results = pretrain.evaluate_encoder(setup, state)
  peak = _vm_hwm_bytes()
  return {'num_train': num_train, 'peak_rss_bytes': peak,
          'features_bytes': (num_train + num_test) * width * 4,
          'rss_before_bytes': before, 'eval_wall_time_s': time.time() - t0,
          'feature_dim': width,
          'linear_probe_accuracy': results.get('linear_probe_accuracy'),
          'pixel_train_examples': results.get('pixel_train_examples')}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--sizes', default='20000,80000')
  parser.add_argument('--num_test', type=int, default=1000)
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--measure', type=int, default=0,
                      help=argparse.SUPPRESS)  # One size, in this process.
  args = parser.parse_args(argv)
  prepared = os.path.join(args.out, 'records')
  if args.measure:
    print(json.dumps(measure(prepared, args.measure, args.num_test, args.image_size)))
    return 0
  sizes = sorted(int(s) for s in args.sizes.split(','))
  write_dataset(args.out, sizes[-1], args.num_test, args.image_size)
  rows = []
  for size in sizes:
    r = subprocess.run(
        [sys.executable, '-m', 'simclr_jax.tools.eval_memory',
         f'--out={args.out}', f'--image_size={args.image_size}',
         f'--num_test={args.num_test}', f'--measure={size}'], capture_output=True, text=True, check=True)
    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
  report = {'image_size': args.image_size, 'num_test': args.num_test,
            'runs': rows}
  with open(os.path.join(args.out, 'eval_memory.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))
  return 0


if __name__ == '__main__':
  sys.exit(main())
