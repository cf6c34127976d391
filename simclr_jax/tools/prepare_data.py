r"""Writes a folder of images as sharded TFRecords in TFDS format, once.

  python -m simclr_jax.prepare_data --folder=PATH --out=DIR
  python -m simclr_jax.main --config=configs/folder.py --workdir=RUN \
      --config.dataset.folder=DIR

A large folder read directly is decoded into every host's memory; prepared,
it is streamed like any TFDS dataset, each host reading only its own shards
(`tfds.even_splits`), with the same augmentation, resume and evaluation. The
splits, labels and order are those of the direct read (data/folder.py), so
a run gives the same data either way. Files that do not decode are skipped
and named (or stop the write with --on_corrupt=fail).
"""

import argparse
import sys
from typing import Sequence

from simclr_jax.data import folder
from simclr_jax.runtime import entry


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m simclr_jax.prepare_data',
      description=__doc__.split('\n\n')[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--folder', required=True,
                      help='Images: class subfolders for labels, optional '
                      'train/validation/test subfolders (local or gs://).')
  parser.add_argument('--out', required=True,
                      help='New directory for the TFRecords and metadata.')
  parser.add_argument('--validation_fraction', type=float, default=0.1,
                      help='Held out as "validation" when the folder has no '
                      'split subfolders (config.dataset.'
                      'folder_validation_fraction of a direct read).')
  parser.add_argument('--seed', type=int, default=0,
                      help='Seed of that split (config.dataset.'
                      'folder_split_seed).')
  parser.add_argument('--examples_per_shard', type=int, default=1024)
  parser.add_argument('--on_corrupt', choices=('skip', 'fail'),
                      default='skip')
  args = parser.parse_args(argv)
  if args.examples_per_shard < 1:
    parser.error('--examples_per_shard must be >= 1')
  try:
    counts = folder.write_tfrecords(
        args.folder, args.out, validation_fraction=args.validation_fraction,
        seed=args.seed, examples_per_shard=args.examples_per_shard,
        on_corrupt=args.on_corrupt)
  except folder.FolderError as e:
    return entry.print_error(e)
  summary = ', '.join(f'{split} {n}' for split, n in counts.items())
  print(f'prepare_data: wrote {summary} images to {args.out}; train with '
        f"--config.dataset.name=folder --config.dataset.folder={args.out}",
        flush=True)
  return 0


def run() -> None:
  entry.configure_logs()  # Before the write imports TensorFlow.
  sys.exit(main())
