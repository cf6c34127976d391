"""A folder of the user's own images as a dataset (`dataset.name='folder'`).

Layout of `config.dataset.folder` (a local path or gs://...):

  FOLDER/<class>/**/*.jpg     labelled: one subfolder per class
  FOLDER/*.jpg                unlabelled (labels -1)
  FOLDER/train/<class>/...    explicit splits: any of train, validation, test,
  FOLDER/validation/...       each labelled or flat as above

Without explicit splits the images are split into 'train' and 'validation'
by a seeded fraction (`dataset.folder_validation_fraction`, drawn with
`dataset.folder_split_seed`), so every run, process and host sees the same
two sets. Class names are sorted and numbered 0.. over the union of the
splits. Files are ordered by their path, so a row id means the same image
to every process.

Two ways to read a folder, with the same augmentation, sharding, resume and
evaluation after that:
  * directly: each split is decoded once per process into uint8 arrays at
    `dataset.raw_size` (or image_size) pixels, shorter side resized and the
    centre square kept, and then read like the embedded digits. For folders
    that fit in host memory.
  * prepared: `python -m simclr_jax.prepare_data --folder=PATH --out=DIR`
    writes sharded TFRecords in TFDS format (`write_tfrecords`), and a run
    with `dataset.folder=DIR` streams them with tf.data like a TFDS dataset,
    each host reading only its own shards. For large folders and pods.

Whatever TensorFlow decodes is accepted (JPEG, PNG, BMP, GIF), in any size,
grey or colour (converted to RGB). A file that does not decode is skipped,
counted and named in a warning, or stops the run with
`dataset.on_corrupt='fail'`, as for TFDS data.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from simclr_jax.data import in_memory
from simclr_jax.data.base import DatasetError
from simclr_jax.data.base import import_tf
from simclr_jax.data.base import import_tfds
from simclr_jax.data.base import raw_size

SPLIT_NAMES = ('train', 'validation', 'test')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# What `write_tfrecords` names its output, read back with
# tfds.builder_from_directory.
PREPARED_NAME = 'image_folder'
_PREPARED_MARKER = 'dataset_info.json'
_FILENAME_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
_DECODE_BATCH = 256


class FolderError(DatasetError):
  """A problem with the image folder; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Listing:
  """The files of a folder, split and labelled, before any image is read.

  Attributes:
    root: the folder.
    splits: split name -> (paths, labels), paths sorted; labels -1 when the
      folder has no class subfolders.
    class_names: sorted class subfolder names; empty when unlabelled.
  """
  root: str
  splits: dict[str, tuple[tuple[str, ...], np.ndarray]]
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _gfile():
  return import_tf('dataset.name=\'folder\'').io.gfile


def is_prepared(root: str) -> bool:
  """Whether `root` holds `write_tfrecords` output (TFDS metadata)."""
  return bool(root) and _gfile().exists(os.path.join(root, _PREPARED_MARKER))


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: str) -> list[str]:
  """All image files below `directory`, recursively, sorted by path."""
  gfile = _gfile()
  found = []
  for dirpath, _, files in gfile.walk(directory):
    found.extend(os.path.join(dirpath, f) for f in files if _is_image(f))
  return sorted(found)


def _entries(directory: str) -> tuple[list[str], list[str]]:
  """(subfolder names, image file names) directly in `directory`, sorted."""
  gfile = _gfile()
  dirs, files = [], []
  for name in gfile.listdir(directory):
    name = name.rstrip('/')
    if gfile.isdir(os.path.join(directory, name)):
      dirs.append(name)
    elif _is_image(name):
      files.append(name)
  return sorted(dirs), sorted(files)


def _classes_of(directory: str) -> list[str]:
  dirs, files = _entries(directory)
  if dirs and files:
    raise FolderError(
        f'{directory} holds both image files ({files[0]}, ...) and '
        f'subfolders ({dirs[0]}, ...): put every image in a class subfolder '
        '(labelled) or none of them (unlabelled).')
  return dirs


def _split_files(directory: str, class_names: Sequence[str]
                 ) -> tuple[tuple[str, ...], np.ndarray]:
  if not class_names:
    paths = _images_under(directory)
    return tuple(paths), np.full(len(paths), -1, np.int32)
  paths, labels = [], []
  for label, name in enumerate(class_names):
    sub = os.path.join(directory, name)
    if _gfile().isdir(sub):
      files = _images_under(sub)
      paths.extend(files)
      labels.extend([label] * len(files))
  order = np.argsort(np.array(paths, dtype=object), kind='stable')
  return (tuple(paths[i] for i in order),
          np.asarray(labels, np.int32)[order] if paths
          else np.zeros(0, np.int32))


def seeded_split(num: int, fraction: float, seed: int) -> np.ndarray:
  """Boolean mask of the `round(num * fraction)` held-out files.

  A pure function of (num, fraction, seed), so the direct read and
  prepare_data hold out the same files.
  """
  held = int(round(num * fraction))
  mask = np.zeros(num, bool)
  mask[np.random.default_rng([int(seed), 0xF01D]).permutation(num)[:held]] = (
      True)
  return mask


@functools.lru_cache(maxsize=8)
def list_folder(root: str, validation_fraction: float = 0.1,
                seed: int = 0) -> Listing:
  """Lists, splits and labels the images of `root` (see the module doc).

  Raises:
    FolderError: missing or empty folder, files beside class subfolders.
  """
  gfile = _gfile()
  if not root or not gfile.isdir(root):
    raise FolderError(
        f'dataset.folder={root!r} is not a directory; set '
        'config.dataset.folder to a folder of images (class subfolders for '
        'labels) or to the output of `python -m simclr_jax.prepare_data`.')
  dirs, _ = _entries(root)
  explicit = [d for d in dirs if d in SPLIT_NAMES]
  if explicit:
    split_dirs = {s: os.path.join(root, s) for s in explicit}
    classes = sorted(set().union(*(_classes_of(d)
                                   for d in split_dirs.values())))
    splits = {s: _split_files(d, classes) for s, d in split_dirs.items()}
  else:
    classes = _classes_of(root)
    paths, labels = _split_files(root, classes)
    if not 0.0 <= validation_fraction < 1.0:
      raise FolderError(
          f'dataset.folder_validation_fraction={validation_fraction} must be '
          'in [0, 1).')
    held = seeded_split(len(paths), validation_fraction, seed)
    splits = {'train': (tuple(p for p, h in zip(paths, held) if not h),
                        labels[~held])}
    if held.any():
      splits['validation'] = (tuple(p for p, h in zip(paths, held) if h),
                              labels[held])
  if not any(len(p) for p, _ in splits.values()):
    raise FolderError(
        f'no images in {root}: expected files ending in '
        f'{", ".join(IMAGE_EXTENSIONS)} (case-insensitive).')
  return Listing(root=root, splits=splits, class_names=tuple(classes))


def listing_of(config: Any) -> Listing:
  """The listing of config.dataset.folder with the config's split rule."""
  d = config.dataset
  return list_folder(d.folder, float(d.get('folder_validation_fraction', 0.1)),
                     int(d.get('folder_split_seed', 0)))


def split_files(listing: Listing, split: str
                ) -> tuple[tuple[str, ...], np.ndarray]:
  """(paths, labels) of one split, or FolderError naming those there are."""
  if split not in listing.splits:
    raise FolderError(
        f'the image folder {listing.root} has no split {split!r}; its splits: '
        f'{sorted(listing.splits)} (set config.dataset.train_split / '
        'eval_split, or add a subfolder of that name).')
  return listing.splits[split]


def decode_files(paths: Sequence[str], size: int | None, *, on_corrupt: str,
                 what: str) -> tuple[Any, np.ndarray]:
  """Decodes image files with tf.data, in order, dropping corrupt ones.

  Args:
    paths: image files.
    size: resize-and-centre-crop side, or None to only check the files
      (then the first result is None).
    on_corrupt: 'skip' (warn, naming each file) or 'fail'.
    what: the dataset and split, for messages.

  Returns:
    (uint8 (N', size, size, 3) or None, int64 (N',) positions in `paths` of
    the files that decoded).

  Raises:
    FolderError: a file did not decode and on_corrupt is 'fail'.
  """
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
  tf = import_tf('dataset.name=\'folder\'')

  def load(i, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)
    if size is None:  # Return something of the image, or the decode is pruned.
      return i, tf.shape(image)
    return i, augment.resize_centre_crop(image, size)

  ds = tf.data.Dataset.from_tensor_slices(
      (np.arange(len(paths), dtype=np.int64), list(paths)))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors().batch(_DECODE_BATCH).prefetch(2)
  kept, images = [], []
  for idx, batch in ds.as_numpy_iterator():
    kept.append(idx)
    images.append(batch)
  kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
  bad = np.setdiff1d(np.arange(len(paths)), kept)
  if bad.size:
    names = ', '.join(paths[i] for i in bad[:5])
    more = f' and {bad.size - 5} more' if bad.size > 5 else ''
    if on_corrupt == 'fail':
      raise FolderError(
          f'{bad.size} corrupt or undecodable image(s) in {what}: {names}'
          f"{more}; fix or remove them, or set config.dataset.on_corrupt="
          "'skip' to skip such images.")
    logging.warning('Skipped %d corrupt or undecodable image(s) in %s: %s%s',
                    bad.size, what, names, more)
  if size is None:
    return None, kept
  out = (np.concatenate(images) if images
         else np.zeros((0, size, size, 3), np.uint8))
  return out, kept


@functools.lru_cache(maxsize=4)
def _decoded(root: str, fraction: float, seed: int, split: str, size: int,
             on_corrupt: str) -> tuple[np.ndarray, np.ndarray]:
  listing = list_folder(root, fraction, seed)
  paths, labels = split_files(listing, split)
  images, kept = decode_files(paths, size, on_corrupt=on_corrupt,
                              what=f'{root} split {split!r}')
  labels = labels[kept].astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_split(config: Any, split: str, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (N, size, size, 3), int32 (N,)) of an unprepared folder's split.

  Decoded once per process and cached; corrupt files are left out.
  """
  d = config.dataset
  return _decoded(d.folder, float(d.get('folder_validation_fraction', 0.1)),
                  int(d.get('folder_split_seed', 0)), split, int(size),
                  str(d.get('on_corrupt', 'skip')))


class FolderSource(in_memory.ArraySource):
  """An image folder read directly: each split decoded once per process into
  uint8 arrays at raw size, then read like the embedded digits."""

  def splits(self):
    return sorted(listing_of(self.config).splits)

  def num_classes(self):
    return listing_of(self.config).num_classes

  def _load(self, split):
    return load_split(self.config, split, raw_size(self.config))


def write_tfrecords(root: str, out: str, *, validation_fraction: float = 0.1,
                    seed: int = 0, examples_per_shard: int = 1024,
                    on_corrupt: str = 'skip') -> dict[str, int]:
  """Writes the folder as sharded TFRecords in TFDS format under `out`.

  Each example holds the file's own encoded bytes (no re-encoding, so a
  PNG stays lossless), its label when the folder has classes, and its path
  relative to `root`. Files that do not decode are left out (or stop the
  write with on_corrupt='fail'). The splits are those of `list_folder`, so
  a prepared folder and the folder read directly hold the same images in
  the same order. Returns examples written per split.
  """
  tf = import_tf('prepare_data')
  tfds = import_tfds(PREPARED_NAME)
  listing = list_folder(root, validation_fraction, seed)
  feature_dict = {'image': tfds.features.Image(shape=(None, None, 3)),
                  'file_name': tfds.features.Text()}
  if listing.class_names:
    feature_dict['label'] = tfds.features.ClassLabel(
        names=list(listing.class_names))
  features = tfds.features.FeaturesDict(feature_dict)
  gfile = tf.io.gfile
  if gfile.exists(os.path.join(out, _PREPARED_MARKER)):
    raise FolderError(f'{out} already holds a prepared dataset; choose a new '
                      '--out or delete it first.')
  gfile.makedirs(out)
  counts = {}
  for split, (paths, labels) in listing.splits.items():
    _, kept = decode_files(paths, None, on_corrupt=on_corrupt,
                           what=f'{root} split {split!r}')
    num_shards = max(1, -(-len(kept) // examples_per_shard))
    shards = np.array_split(kept, num_shards)
    for k, rows in enumerate(shards):
      name = (f'{PREPARED_NAME}-{split}.tfrecord-{k:05d}-of-'
              f'{num_shards:05d}')
      with tf.io.TFRecordWriter(os.path.join(out, name)) as writer:
        for i in rows:
          with gfile.GFile(paths[i], 'rb') as f:
            example = {'image': f.read(),
                       'file_name': os.path.relpath(paths[i], root)}
          if listing.class_names:
            example['label'] = int(labels[i])
          writer.write(features.serialize_example(example))
    counts[split] = int(len(kept))
    logging.info('prepare_data: %s: %d images in %d shards', split,
                 len(kept), num_shards)
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=features, filename_template=_FILENAME_TEMPLATE,
      check_data=False, description=f'Images of {root} (simclr_jax '
      'prepare_data).')
  with gfile.GFile(os.path.join(out, 'prepare_data.json'), 'w') as f:
    json.dump({'folder': root, 'validation_fraction': validation_fraction,
               'seed': seed, 'counts': counts,
               'class_names': list(listing.class_names)}, f, indent=2)
  return counts


def write_image_folder(root: str, splits: dict[str, tuple[np.ndarray,
                                                          np.ndarray]],
                       class_names: Sequence[str] | None = None) -> None:
  """Writes arrays as a labelled PNG folder: ROOT/<split>/<class>/<row>.png.

  PNG is lossless, so `load_split` gives back exactly these pixels (rows
  reordered by path). Used to turn the embedded digits into a folder
  (`docs/your_images.md`) and by the tests.

  Args:
    root: the folder to create.
    splits: split name -> (uint8 (N, H, W, 3), int labels (N,)).
    class_names: label -> subfolder name; default the label as a number.
  """
  tf = import_tf('write_image_folder')
  for split, (images, labels) in splits.items():
    for row, (image, label) in enumerate(zip(images, labels)):
      name = class_names[label] if class_names else str(int(label))
      directory = os.path.join(root, split, name)
      tf.io.gfile.makedirs(directory)
      tf.io.write_file(os.path.join(directory, f'{row:06d}.png'),
                       tf.io.encode_png(np.asarray(image, np.uint8)))
