"""Encoders by name: `config.model.name` picks one, and each kind declares
what the rest of the code needs to know about it.

The training steps, the read-outs, fine-tuning, distillation, embedding,
export and the benchmark never construct an encoder themselves: they call
`build_encoder(config)` (or `from_kwargs` for an exported artifact), and ask
the kind for its feature width (`module.num_features`), its settings as JSON
(`encoder_kwargs`), the parameters that get no weight decay or LARS
adaptation (`NO_DECAY_LEAVES`) and the ones that never train
(`frozen_submodules`). A new backbone is its module plus one `register` call
here, and a recipe that names it.

  name      settings                                 module
  'resnet'  model.depth, width_multiplier, sk_ratio,  models.ResNet
            stem, maxpool_padding
  'vit'     model.vit.size (width, depth, num_heads   models.ViT
            override it when > 0), patch_size, pool,
            pos_embed, frozen_patch_embed
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models import resnet
from simclr_jax.models import vit

Dtype = Any
# Configs written before the registry name no encoder: they are ResNets.
DEFAULT = 'resnet'


@dataclasses.dataclass(frozen=True)
class EncoderKind:
  """One kind of encoder and what callers ask of it.

  Attributes:
    name: The `config.model.name` that selects it.
    module: The flax.linen Module class; built as module(**kwargs,
      dtype=..., bn_axis_name=...).
    kwargs: (config.model, image size) -> the module's settings as JSON
      values, what an exported artifact records to rebuild it.
    check: (config.model, image size) -> None, or a one-line ValueError
      naming the bad field.
    no_decay_leaves: Parameter leaf names that get neither weight decay nor
      LARS's trust ratio (on top of every kind's biases and norm scales).
    frozen_submodules: kwargs -> names of the encoder's submodules the
      optimiser never updates.
    fine_tune_block: kwargs -> (top-level submodule name -> its
      fine_tune_after_block number: 0 the stem or embeddings, 1..4 the
      stages, so partial fine-tuning freezes 0..k).
    resume_fields: Config fields that fix the shapes of its parameters, which
      a resumed run must share with its checkpoint.
    describe: kwargs -> a short name for logs and benchmark lines.
  """
  name: str
  module: type[nn.Module]
  kwargs: Callable[[Any, int], dict[str, Any]]
  check: Callable[[Any, int], None]
  no_decay_leaves: tuple[str, ...]
  frozen_submodules: Callable[[dict[str, Any]], tuple[str, ...]]
  fine_tune_block: Callable[[dict[str, Any]], Callable[[str], int | None]]
  resume_fields: tuple[str, ...]
  describe: Callable[[dict[str, Any]], str]


ENCODERS: dict[str, EncoderKind] = {}


def register(kind: EncoderKind) -> EncoderKind:
  """Adds a kind of encoder under its name (one per name)."""
  if kind.name in ENCODERS:
    raise ValueError(f'encoder {kind.name!r} is registered twice')
  ENCODERS[kind.name] = kind
  return kind


def name_of(model_config: Any) -> str:
  """config.model.name, 'resnet' for configs that predate the field."""
  return model_config.get('name', DEFAULT)


def kind_of(model_config: Any) -> EncoderKind:
  """The registered kind `config.model.name` names; one-line error else."""
  name = name_of(model_config)
  if name not in ENCODERS:
    raise ValueError(f'model.name={name!r} is not supported; choose one of '
                     f'{", ".join(sorted(ENCODERS))}')
  return ENCODERS[name]


def check(model_config: Any, image_size: int) -> None:
  """One-line ValueError for a bad encoder setting, before any tracing."""
  kind_of(model_config).check(model_config, image_size)


def encoder_kwargs(model_config: Any, image_size: int) -> dict[str, Any]:
  """The encoder's settings as JSON values (what an artifact records)."""
  return kind_of(model_config).kwargs(model_config, image_size)


def from_kwargs(name: str, kwargs: dict[str, Any], *,
                dtype: Dtype = jnp.float32,
                bn_axis_name: str | None = None) -> nn.Module:
  """The encoder of kind `name` with the recorded settings `kwargs`."""
  if name not in ENCODERS:
    raise ValueError(f'encoder {name!r} is not supported; choose one of '
                     f'{", ".join(sorted(ENCODERS))}')
  return ENCODERS[name].module(**kwargs, dtype=dtype,
                               bn_axis_name=bn_axis_name)


def build_encoder(model_config: Any, image_size: int, *,
                  dtype: Dtype = jnp.float32,
                  bn_axis_name: str | None = None) -> nn.Module:
  """The encoder `config.model` describes, for images of `image_size` px.

  The image size matters where a kind adapts to it (the ResNet's CIFAR stem
  under stem='auto'; the ViT's patch grid).
  """
  check(model_config, image_size)
  return from_kwargs(name_of(model_config),
                     encoder_kwargs(model_config, image_size), dtype=dtype,
                     bn_axis_name=bn_axis_name)


def describe(model_config: Any, image_size: int) -> str:
  """A short name for logs and benchmark lines: 'resnet50x1.0',
  'vit_small_p4'."""
  kind = kind_of(model_config)
  return kind.describe(kind.kwargs(model_config, image_size))


def no_decay_leaves() -> tuple[str, ...]:
  """Leaf names excluded from weight decay and LARS adaptation, over all
  kinds: biases and norm scales everywhere, plus what each kind declares."""
  names = {'bias', 'scale'}
  for kind in ENCODERS.values():
    names.update(kind.no_decay_leaves)
  return tuple(sorted(names))


def frozen_submodules(model_config: Any, image_size: int) -> tuple[str, ...]:
  """Names of the encoder's submodules that never train under this config."""
  kind = kind_of(model_config)
  return kind.frozen_submodules(kind.kwargs(model_config, image_size))


def fine_tune_block(model_config: Any, image_size: int
                    ) -> Callable[[str], int | None]:
  """name -> fine_tune_after_block number, for this config's encoder."""
  kind = kind_of(model_config)
  return kind.fine_tune_block(kind.kwargs(model_config, image_size))


def frozen_mask(model_config: Any, image_size: int
                ) -> Callable[[Any], Any] | None:
  """params -> a tree of bools, True under a frozen submodule of the
  encoder (params['encoder'][name]); None when nothing is frozen."""
  names = frozen_submodules(model_config, image_size)
  if not names:
    return None

  def key(entry: Any) -> str:
    return str(getattr(entry, 'key', getattr(entry, 'name', entry)))

  def mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (len(path) > 1 and key(path[0]) == 'encoder'
                         and key(path[1]) in names), params)
  return mask


def resume_fields(model_config: Any) -> tuple[str, ...]:
  """Config fields that fix the shapes of this encoder's parameters."""
  return ('model.name',) + kind_of(model_config).resume_fields


# --- ResNet --------------------------------------------------------------


def _resnet_kwargs(m: Any, image_size: int) -> dict[str, Any]:
  return dict(depth=int(m.depth), width_multiplier=float(m.width_multiplier),
              sk_ratio=float(m.sk_ratio),
              cifar_stem=resnet.uses_cifar_stem(m, image_size),
              maxpool_padding=m.get('maxpool_padding', 'torch'))


def _resnet_check(m: Any, image_size: int) -> None:
  del image_size
  resnet.check_depth(m.depth)
  resnet.check_stem(m.stem)
  resnet.check_maxpool_padding(m.get('maxpool_padding', 'torch'))


def _resnet_describe(kw: dict[str, Any]) -> str:
  sk = '-sk' if kw.get('sk_ratio', 0) else ''
  return f'resnet{kw["depth"]}x{kw["width_multiplier"]}{sk}'


register(EncoderKind(
    name='resnet', module=resnet.ResNet, kwargs=_resnet_kwargs,
    check=_resnet_check, no_decay_leaves=(),
    frozen_submodules=lambda kw: (),
    fine_tune_block=lambda kw: resnet.fine_tune_block,
    resume_fields=('model.depth', 'model.width_multiplier', 'model.sk_ratio',
                   'model.stem'),
    describe=_resnet_describe))


# --- Vision Transformer --------------------------------------------------


def _vit_kwargs(m: Any, image_size: int) -> dict[str, Any]:
  del image_size
  v = m.vit
  vit.check_size(v.size)
  sized = vit.VIT_SIZES[v.size]
  # 0 keeps the size's value; a CPU recipe may thin or shorten the net.
  width, depth, heads = (int(v.get(f, 0)) or d for f, d in zip(
      ('width', 'depth', 'num_heads'), sized))
  return dict(width=width, depth=depth, num_heads=heads,
              patch_size=int(v.patch_size), pool=v.pool,
              pos_embed=v.pos_embed,
              frozen_patch_embed=bool(v.frozen_patch_embed),
              remat=bool(v.get('remat', False)))


def _vit_check(m: Any, image_size: int) -> None:
  v = m.vit
  vit.check_size(v.size)
  for field in ('width', 'depth', 'num_heads'):
    value = v.get(field, 0)
    if not isinstance(value, int) or value < 0:
      raise ValueError(f'model.vit.{field}={value!r} is invalid: a count '
                       '>= 0 (0 keeps the size\'s)')
  kw = _vit_kwargs(m, image_size)
  if kw['width'] % kw['num_heads']:
    raise ValueError(f'model.vit width {kw["width"]} is not divisible by its '
                     f'{kw["num_heads"]} heads')
  if kw['pos_embed'] == 'sincos' and kw['width'] % 4:
    raise ValueError(f'model.vit.pos_embed=\'sincos\' needs a width '
                     f'divisible by 4, got {kw["width"]}')
  if not isinstance(v.patch_size, int) or v.patch_size <= 0 or (
      image_size % v.patch_size):
    raise ValueError(f'model.vit.patch_size={v.patch_size!r} is invalid: it '
                     f'must divide the {image_size} px images')
  if v.pool not in vit.POOLS:
    raise ValueError(f'model.vit.pool={v.pool!r} is not supported; choose '
                     f'one of {", ".join(vit.POOLS)}')
  if v.pos_embed not in vit.POS_EMBEDS:
    raise ValueError(f'model.vit.pos_embed={v.pos_embed!r} is not supported; '
                     f'choose one of {", ".join(vit.POS_EMBEDS)}')


def _vit_describe(kw: dict[str, Any]) -> str:
  size = next((s for s, dims in vit.VIT_SIZES.items()
               if dims == (kw['width'], kw['depth'], kw['num_heads'])),
              f'{kw["width"]}x{kw["depth"]}')
  return f'vit_{size}_p{kw["patch_size"]}'


register(EncoderKind(
    name='vit', module=vit.ViT, kwargs=_vit_kwargs, check=_vit_check,
    # The position table and class token are embeddings, not weights to
    # shrink (MoCo v3 and timm leave them out of weight decay).
    no_decay_leaves=('pos_embed', 'cls_token'),
    frozen_submodules=lambda kw: (
        ('patch_embed',) if kw['frozen_patch_embed'] else ()),
    fine_tune_block=lambda kw: functools.partial(vit.fine_tune_block,
                                                 depth=kw['depth']),
    resume_fields=('model.vit.size', 'model.vit.width', 'model.vit.depth',
                   'model.vit.num_heads', 'model.vit.patch_size',
                   'model.vit.pos_embed', 'model.vit.pool'),
    describe=_vit_describe))
