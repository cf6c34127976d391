"""Default configuration shared by every recipe under configs/.

Each recipe starts from `base_config()` and overrides what differs, so a field
exists in every config and command-line overrides (`--config.x=...`) always
find it. Values follow the SimCLR papers and released code where they set one
(docs/algorithms.md).

Every duration is a `{prefix}_steps` / `{prefix}_epochs` pair read by
config/durations.py: a `_steps` value > 0 wins (as `train_steps` over
`num_epochs`), so the epochs of a pair whose steps default to > 0 take effect
with the steps set to 0.
"""

import ml_collections

from simclr_jax.data import fashion_mnist


# The fields of config.dataset an evals entry's `dataset` may replace; ''
# keeps the pretraining dataset's value.
EVAL_DATASET_FIELDS = ('name', 'folder', 'data_dir', 'train_split',
                       'eval_split')


def eval_entry(kind: str, *, enabled: bool = True, every_steps: int = 0,
               every_epochs: float = 0.0,
               **dataset: str) -> ml_collections.ConfigDict:
  """One config.evals entry, every field present so that the command line
  can set any of them.

  kind: a read-out type (evaluation/registry.TYPES). dataset: fields of
  EVAL_DATASET_FIELDS replacing config.dataset's, e.g. another split or a
  labelled dataset for an encoder pretrained on unlabelled images.
  every_steps / every_epochs: both 0 runs the entry at the end of the run
  only; otherwise also during pretraining at that interval (the kNN
  monitor), on at most eval.monitor_max_examples images per split.
  """
  fields = {f: dataset.pop(f, '') for f in EVAL_DATASET_FIELDS}
  if dataset:
    raise ValueError(f'unknown dataset fields {sorted(dataset)}: use '
                     f'{", ".join(EVAL_DATASET_FIELDS)}')
  return ml_collections.ConfigDict(dict(
      type=kind, enabled=enabled, every_steps=every_steps,
      every_epochs=float(every_epochs),
      dataset=ml_collections.ConfigDict(fields)))


def base_config() -> ml_collections.ConfigDict:
  """Returns the full config schema with reference defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # An accelerator recipe: main refuses to run it on CPU-only JAX unless
  # --allow_cpu (runtime/accelerator.py). Set by the ImageNet-scale configs.
  c.requires_accelerator = False
  c.method = 'simclr'
  # Downstream modes (linear_eval, finetune, distill, embed, export) start from
  # the checkpoint of the run whose --workdir this names.
  c.init_from = ''

  # Data. `name` is 'digits' (embedded), 'fashion_mnist' (its IDX files),
  # 'synthetic', 'folder' (your own images) or any TFDS image dataset
  # name[:version], such as 'cifar10', 'stl10', 'imagenet2012', 'food101',
  # 'oxford_flowers102:2.1.1'. Array datasets (all but TFDS and prepared
  # folders) slice their splits as TFDS does: 'train[:50000]'.
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.train_split = 'train'
  # A dataset without this split is evaluated on 'test' or 'validation', or
  # on a held-out 10% of its only split (config/resolve.py settles it and
  # logs which).
  c.dataset.eval_split = 'test'
  # TFDS feature names; '' = found in the builder's info ('image'/'label',
  # or the only Image/ClassLabel feature; no ClassLabel = unlabelled).
  c.dataset.image_key = ''
  c.dataset.label_key = ''
  # name='folder': a folder of images (class subfolders = labels, none =
  # unlabelled; optional train/validation/test subfolders), or the output
  # of `python -m simclr_jax.prepare_data`. Without split subfolders a
  # seeded fraction is held out as 'validation'.
  c.dataset.folder = ''
  c.dataset.folder_validation_fraction = 0.1
  c.dataset.folder_split_seed = 0
  # name='fashion_mnist': the folder of its four IDX files (gzipped or not);
  # Debian's `apt-get install dataset-fashion-mnist` puts them here.
  c.dataset.fashion_mnist_dir = fashion_mnist.DEFAULT_DIR
  c.dataset.image_size = 32  # Size of the augmented views fed to the encoder.
  # For the on-device ('jax') augmentation of variable-size images, the host
  # resizes every image to raw_size x raw_size first (0 = image_size).
  c.dataset.raw_size = 0
  # Shuffle buffer = multiplier x per-host batch (50 CIFAR, 10 else; released code).
  c.dataset.shuffle_buffer_multiplier = 50
  c.dataset.cache = True
  # TFDS datasets: read the train split into host memory and index it by row
  # id (as digits is), instead of streaming it. For small datasets; needed by
  # methods with per-image state of the split (DeepCluster).
  c.dataset.in_memory = False
  c.dataset.prefetch = 2  # Batches prefetched onto the devices.
  # A TFDS image that does not decode: 'skip' (drop it, count it, warn with
  # its record id) or 'fail' (stop with a message naming the record).
  c.dataset.on_corrupt = 'skip'

  c.augment = ml_collections.ConfigDict()
  c.augment.backend = 'tf'  # 'tf' (tf.data on host CPU) or 'jax' (on device).
  c.augment.color_strength = 0.5
  c.augment.blur = False
  # Pretraining crop and flip: the reference's crop down to 8% of the area
  # and its horizontal flip.
  c.augment.crop_min_area = 0.08
  c.augment.flip = True
  # The crop + flip of linear_eval, finetune and distill: the reference's
  # random crop down to 8% of the area and a horizontal flip. 8x8 digits
  # lose their class to both, so configs/digits.py sets gentler values.
  c.augment.finetune_crop_min_area = 0.08
  c.augment.finetune_flip = True

  c.model = ml_collections.ConfigDict()
  # The encoder by name (models/encoders.py): 'resnet' reads depth ...
  # maxpool_padding below, 'vit' the model.vit section.
  c.model.name = 'resnet'
  c.model.depth = 18
  c.model.width_multiplier = 1.0
  c.model.sk_ratio = 0.0
  c.model.stem = 'auto'  # 'auto' picks the CIFAR stem for image_size <= 32.
  # ImageNet-stem max-pool padding: 'torch' (1, 1), as torchvision computes,
  # or 'tf' (TF 'SAME', the SimCLR reference's; (0, 1) on even-sized maps).
  c.model.maxpool_padding = 'torch'
  c.model.num_proj_layers = 2  # SimCLRv1: 2, SimCLRv2: 3.
  c.model.proj_out_dim = 128
  # Hidden width of the head (0 = the encoder's, as SimCLR's reference) and
  # whether its output BN has a gamma (SimCLR: yes; MoCo v3's ViT head ends
  # in a BN without affine parameters).
  c.model.proj_hidden_dim = 0
  c.model.proj_out_bn_scale = True
  c.model.ft_proj_selector = 0
  c.model.linear_eval_while_pretraining = True
  c.model.compute_dtype = 'float32'  # or 'bfloat16'; params stay float32.
  # Vision Transformer (model.name='vit'): a standard size ('tiny', 'small',
  # 'base'; width, depth and num_heads > 0 override it), patch 16 for 224 px
  # or 4 / 7 for 32 / 28 px, the class token or the patch mean as the
  # feature, learned or fixed sine-cosine position embeddings, and MoCo v3's
  # frozen random patch projection. remat recomputes each block's
  # activations in the backward pass: the same numbers in less memory.
  c.model.vit = ml_collections.ConfigDict(dict(
      size='small', width=0, depth=0, num_heads=0, patch_size=16, pool='cls',
      pos_embed='learned', frozen_patch_embed=False, remat=False))

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.5

  # Settings of the other methods, one section each, named as the method
  # (`Method.section`; the margin section serves triplet and
  # contrastive_margin). Every method reads its temperature from
  # loss.temperature.
  c.moco_v2 = ml_collections.ConfigDict(dict(momentum=0.999, queue_size=65536))
  # predictor_out_bn: the predictor ends in a BN without affine parameters
  # (MoCo v3's ViT recipe; its ResNet recipe has none).
  c.moco_v3 = ml_collections.ConfigDict(
      dict(momentum=0.99, predictor_hidden_dim=4096, predictor_out_bn=False))
  c.byol = ml_collections.ConfigDict(
      dict(momentum=0.996, predictor_hidden_dim=4096))
  # queue_length: past features per view added to the Sinkhorn (0 = none;
  # a multiple of batch_size), used from queue_start on. The prototypes stay
  # frozen for the first freeze_prototypes steps (0 = never frozen).
  c.swav = ml_collections.ConfigDict(
      dict(num_prototypes=3000, epsilon=0.05, sinkhorn_iterations=3,
           freeze_prototypes_steps=313, freeze_prototypes_epochs=0.0,
           queue_length=0, queue_start_epochs=15.0, queue_start_steps=0))
  c.instdisc = ml_collections.ConfigDict(
      dict(num_negatives=4096, bank_momentum=0.5))
  c.hcl = ml_collections.ConfigDict(dict(beta=1.0, tau_plus=0.1))
  # DeepCluster (methods/deepcluster.py): k-means on PCA-whitened features of
  # the whole train split every `recluster_every_epochs` (or, if > 0,
  # `recluster_every_steps`); a fresh classifier on h learns the cluster ids
  # with plain SGD (no momentum) at head_learning_rate / head_weight_decay.
  c.deepcluster = ml_collections.ConfigDict(
      dict(num_clusters=10000, pca_dim=256, kmeans_iterations=20,
           recluster_every_epochs=1.0, recluster_every_steps=0,
           head_learning_rate=0.05, head_weight_decay=1e-5))
  # symmetric: mean of eq. 5 with either view as the "original" (False: view
  # a only, eq. 5 as written).
  c.invaspread = ml_collections.ConfigDict(dict(symmetric=True))
  # base_temperature 0 = the temperature itself (SupContrast scaling T/base_T = 1).
  c.supcon = ml_collections.ConfigDict(dict(base_temperature=0.0))
  # Triplet / pairwise margin losses; use_labels=False: instance positives.
  c.margin = ml_collections.ConfigDict(
      dict(margin=1.0, use_labels=False, batch_hard=True))

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'lars'  # 'lars', 'sgd' (momentum) or 'adamw'.
  c.optim.base_learning_rate = 1.0
  c.optim.lr_scaling = 'linear'  # peak = base * B / 256 ('linear') or base * sqrt(B).
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-6
  c.optim.trust_coefficient = 0.001
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs.

  c.batch_size = 512  # Global batch (images; each gives two views).
  # Gradient caching (simclr_jax/training/grad_cache.py): > 0 computes each step's
  # gradient in this many chunks, for global batches larger than memory;
  # BN statistics are then per chunk ('per_chunk') or the running ones
  # ('frozen', exact full-batch gradient, no statistic updates).
  c.grad_cache_chunks = 0
  c.grad_cache_bn = 'per_chunk'
  # > 0: a per-device batch larger than this turns on gradient caching with
  # the fewest chunks that fit (when grad_cache_chunks is 0); the log says so.
  c.max_batch_per_device = 0
  c.num_epochs = 100
  c.train_steps = 0  # > 0 overrides num_epochs.

  # Intervals of the training loop (pretraining and the downstream modes),
  # in steps or, with the steps 0, epochs of the mode's own training data.
  c.log_every_steps = 50
  c.log_every_epochs = 0.0
  c.checkpoint_every_steps = 500
  c.checkpoint_every_epochs = 0.0
  c.keep_checkpoints = 2
  c.on_nan = 'stop'  # or 'skip_step' (keep the state, count the step).

  # Testing aids, never needed for real runs.
  c.debug = ml_collections.ConfigDict()
  # Makes the loss and gradients NaN at this global step (1-based, as logged)
  # inside the jitted step, to exercise on_nan; -1 = off.
  c.debug.inject_nan_at_step = -1
  # Also writes every test example's end-of-run kNN prediction to
  # results.json (knn_predictions), to compare two runs example by example.
  c.debug.record_knn_predictions = False

  # Settings every read-out shares; which read-outs run is config.evals.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  c.eval.knn_k = 200
  c.eval.knn_temperature = 0.1
  # Cap per split for the read-outs during pretraining; 0 = all.
  c.eval.monitor_max_examples = 0
  c.eval.fewshot_shots = (1, 5, 10)
  c.eval.fewshot_draws = 10
  # Bytes of a split's (n x d float32) features up to which they are
  # gathered whole on every host for the read-outs; larger splits stay
  # spread over the hosts, each holding its own rows (ImageNet's training
  # features: 10 GB in all, 1/16 of it per host on 16 hosts). 1 GiB keeps
  # CIFAR's and ImageNet's validation features whole
  # (evaluation/features.py GATHER_MAX_BYTES).
  c.eval.feature_gather_max_bytes = 2 ** 30
  # Images per split the pixel baseline reads at most; 0 = the whole split,
  # the images the encoder is read out on, so the comparison is fair (a
  # grey dataset's pixels, each read once, are 188 MB for Fashion-MNIST's
  # 60,000). A positive cap reads a seeded subsample instead, for datasets
  # whose flattened pixels would not fit (results.json records
  # pixel_train_examples beside the encoder's probe_train_examples).
  c.eval.pixel_max_examples = 0

  # The read-outs of the run, as big_vision's config.evals: entry name ->
  # what to read out (`type`, evaluation/registry.py), on which dataset and
  # when (eval_entry below). Their results.json keys start with the entry's
  # name. The defaults: the pretrained encoder three ways, and the same three
  # read-outs of the network at random init and of the raw pixels, the
  # baselines a representation has to beat (off in the ImageNet recipes).
  # `enabled=False` turns an entry off (from the command line too:
  # --config.evals.pixel.enabled=False).
  c.evals = ml_collections.ConfigDict()
  c.evals.linear_probe = eval_entry('probe')
  c.evals.fewshot_probe = eval_entry('fewshot')
  c.evals.knn = eval_entry('knn')
  c.evals.random_init = eval_entry('random_init')
  c.evals.pixel = eval_entry('pixels')

  # Downstream modes (simclr_jax/downstream/;
  # docs/algorithms.md#evaluation-protocols). Every section trains with momentum SGD, peak LR = learning_rate * B/256 ('linear') or
  # * sqrt(B) ('sqrt'), no warmup, cosine decay; wd on kernels only.
  # linear_eval: frozen encoder (BN in inference mode), linear classifier on h.
  c.linear_eval = ml_collections.ConfigDict(dict(
      epochs=90.0, batch_size=4096, learning_rate=0.1, lr_scaling='linear',
      momentum=0.9, nesterov=True,
      weight_decay=0.0,  # 0 CIFAR; 1e-6 ImageNet.
      fast_probe=True,  # Also the main job's probes/kNN on the same features.
      probe_max_examples=50000))  # Per split, for the fast probe (0 = all).
  # finetune: encoder + model.ft_proj_selector head layers + classifier on
  # label_fraction of the labels (SimCLRv2: 1% 60 epochs, 10% 30 epochs, from
  # head layer 1, lr 0.005 * sqrt(B) = 0.16 at B=1024, wd 0).
  # fine_tune_after_block: -1 trains all; 0 freezes the stem; k in 1..4 the
  # stem and stages 1..k. from_scratch: the same network from random init.
  c.finetune = ml_collections.ConfigDict(dict(
      epochs=30.0, batch_size=1024, learning_rate=0.005, lr_scaling='sqrt',
      momentum=0.9, nesterov=True, weight_decay=0.0, label_fraction=0.1,
      label_seed=0, fine_tune_after_block=-1, from_scratch=False))
  # distill: init_from = the fine-tuned teacher's workdir; the student is
  # config.model's ResNet. labelled_weight mixes in the labelled CE (0 = pure
  # distillation, SimCLRv2's choice with few labels).
  c.distill = ml_collections.ConfigDict(dict(
      epochs=30.0, batch_size=1024, learning_rate=0.005, lr_scaling='sqrt',
      momentum=0.9, nesterov=True, weight_decay=0.0, temperature=1.0,
      labelled_weight=0.0))
  # embed: 2-D picture of the eval-split encoder features ('pca' or 'tsne');
  # with `target` (a dataset name) both domains' features, coloured by domain
  # and by class.
  c.embed = ml_collections.ConfigDict(dict(method='tsne', max_points=5000,
                                           target=''))
  # adapt (--mode=adapt): labelled config.dataset (source) + unlabelled
  # `target` in every batch of batch_size per domain. method: source_only,
  # dann, coral, mmd, contrastive (SimCLR on source+target images first,
  # contrastive_epochs, then the source classifier), or contrastive+dann /
  # +coral / +mmd. weight: the alignment term's weight (DANN: the reversal
  # scale's maximum). Starts from config.init_from if set, else scratch.
  c.adapt = ml_collections.ConfigDict(dict(
      method='source_only', target='digits_m', target_data_dir='',
      target_train_split='train', target_eval_split='test', weight=1.0,
      dann_gamma=10.0, domain_hidden_dim=256, contrastive_epochs=20,
      compare_source_only=False, epochs=30.0, batch_size=128,
      learning_rate=0.1, lr_scaling='linear', momentum=0.9, nesterov=True,
      weight_decay=5e-4))
  # export (simclr_jax/export/): include_head also writes the projection head;
  # torchvision: 'auto' writes resnet{depth}.safetensors when torchvision has
  # the architecture (width 1, no SK) and records why not otherwise,
  # 'require' fails instead, 'off' skips it.
  c.export = ml_collections.ConfigDict(dict(include_head=True,
                                            torchvision='auto'))
  return c


# Fields a run resumed in a workdir must share with the run that wrote its
# checkpoint (training/workdir.check_and_record): they fix the shapes of the
# checkpointed state or what it means. 'pretrain': the heads, optimiser,
# data and method of the sections above; each method adds its own section's
# (Method.resume_shape_fields). 'downstream' (linear_eval, finetune, distill,
# adapt): the source run and the 'downstream' section their recorded
# config.json carries (config/downstream.recorded_config). Both add the
# encoder's own fields (models/encoders.resume_fields).
RESUME_FIELDS = {
    'pretrain': ('model.num_proj_layers', 'model.proj_out_dim',
                 'model.proj_hidden_dim', 'model.proj_out_bn_scale',
                 'model.linear_eval_while_pretraining', 'optim.name',
                 'dataset.name', 'method'),
    'downstream': ('init_from', 'dataset.name', 'model.ft_proj_selector', 'downstream.label_fraction',
                   'downstream.label_seed', 'downstream.from_scratch',
                   'downstream.fine_tune_after_block', 'downstream.teacher',
                   'downstream.method', 'downstream.target'),
}


def resume_fields(config: ml_collections.ConfigDict,
                  mode: str) -> tuple[str, ...]:
  """The dotted fields a resume of `mode` ('pretrain' or a downstream
  training mode) checks against the workdir's recorded config."""
  # Here, not at the top: recipes import this module without JAX.
  from simclr_jax.models import encoders  # pylint: disable=g-import-not-at-top
  network = encoders.resume_fields(config.model)
  if mode == 'pretrain':
    from simclr_jax import methods  # pylint: disable=g-import-not-at-top
    return (RESUME_FIELDS['pretrain'] + network +
            methods.resume_shape_fields(config))
  return RESUME_FIELDS['downstream'] + network


def recipe_module(path: str):
  """The module of a recipe file, loaded by path (recipes are plain files,
  not a package), so a recipe can call another's helpers."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'simclr_recipe_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_recipe(path: str,
                arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a recipe file, so variants can extend a recipe.

  Recipes are plain files loaded by path (not a package), so a variant such
  as configs/imagenet_resnet50_b8192.py reads its base this way. `arg` is
  what `--config=PATH:ARG` passes: `get_config(arg)` unless it is None.
  """
  module = recipe_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


# Per-dataset SimCLR recipes the method recipes (configs/methods/) start from.
_DATASET_RECIPES = {'digits': 'digits.py', 'fashion_mnist': 'fashion_mnist.py',
                    'cifar10': 'cifar10_resnet18.py'}


def dataset_recipe(dataset: str, configs_dir: str) -> ml_collections.ConfigDict:
  """The SimCLR recipe of `dataset` from the recipe folder `configs_dir`."""
  import os  # pylint: disable=g-import-not-at-top
  if dataset not in _DATASET_RECIPES:
    raise ValueError(f'no recipe for dataset {dataset!r}; choose one of '
                     + ', '.join(sorted(_DATASET_RECIPES)))
  return load_recipe(os.path.join(configs_dir, _DATASET_RECIPES[dataset]))
