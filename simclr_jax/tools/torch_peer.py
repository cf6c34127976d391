"""A PyTorch SimCLR train step of the same shape, to put the JAX figures in context.

`python -m simclr_jax.benchmark --torch_peer` times this step in the same
process as the JAX step, on the same batch and image size, and reports the
ratio of views per second. The peer is what a competent PyTorch user would
write, not a strawman: torchvision's residual blocks, channels_last memory
format, bfloat16 autocast on CUDA (float32 on CPU, where autocast would only
add casts), optional `torch.compile`, the same NT-Xent with the paper's 1/(2N)
normalisation (Chen et al. 2020a, Algorithm 1), the projection head and online
linear head of docs/algorithms.md#model, and a fused (foreach) SGD-momentum
step. The JAX step uses LARS, which adds two norms per layer, so the ratio if
anything favours torch slightly. It runs on one device (the JAX figure should
then come from a one-device mesh for a like-for-like ratio).

Only this module imports torch; the rest of the package never does.
"""

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

_LAYOUTS = {
    18: (tv_resnet.BasicBlock, (2, 2, 2, 2)),
    34: (tv_resnet.BasicBlock, (3, 4, 6, 3)),
    50: (tv_resnet.Bottleneck, (3, 4, 6, 3)),
    101: (tv_resnet.Bottleneck, (3, 4, 23, 3)),
    152: (tv_resnet.Bottleneck, (3, 8, 36, 3)),
    200: (tv_resnet.Bottleneck, (3, 24, 36, 3)),
}


def _scaled(channels: int, width_multiplier: float) -> int:
  # Same rounding as simclr_jax.models.resnet.scaled_width.
  return max(1, int(round(channels * width_multiplier)))


class ResNet(nn.Module):
  """torchvision's ResNet with a width multiplier and the CIFAR stem option.

  torchvision hard-codes 64..512 channels and the ImageNet stem; the blocks
  are torchvision's own, so at width 1 with the ImageNet stem this is
  torchvision.models.resnetXX without the classifier.
  """

  def __init__(self, depth: int, width_multiplier: float = 1.0,
               cifar_stem: bool = False):
    super().__init__()
    block, layers = _LAYOUTS[depth]
    self.inplanes = _scaled(64, width_multiplier)
    if cifar_stem:  # 3x3 stride-1 conv, no max-pool (docs/algorithms.md#stems).
      stem = [nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False),
              nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True)]
    else:
      stem = [nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False),
              nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    self.stem = nn.Sequential(*stem)
    stages = []
    for i, (channels, n) in enumerate(zip((64, 128, 256, 512), layers)):
      stages.append(self._make_stage(block, _scaled(channels,
                                                    width_multiplier),
                                     n, 1 if i == 0 else 2))
    self.stages = nn.Sequential(*stages)
    self.out_dim = _scaled(512, width_multiplier) * block.expansion
    for m in self.modules():
      # Last BN gamma of every residual block starts at 0 (Goyal et al. 2017).
      if isinstance(m, tv_resnet.Bottleneck):
        nn.init.zeros_(m.bn3.weight)
      elif isinstance(m, tv_resnet.BasicBlock):
        nn.init.zeros_(m.bn2.weight)

  def _make_stage(self, block, planes: int, blocks: int, stride: int):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          tv_resnet.conv1x1(self.inplanes, planes * block.expansion, stride),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stages(self.stem(x))
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class SimCLRNet(nn.Module):
  """Encoder, projection head (Linear-BN[-ReLU]) and linear head on h.detach()."""

  def __init__(self, depth: int, width_multiplier: float, cifar_stem: bool,
               num_proj_layers: int, proj_out_dim: int, num_classes: int):
    super().__init__()
    self.encoder = ResNet(depth, width_multiplier, cifar_stem)
    dim = self.encoder.out_dim
    layers = []
    for i in range(1, num_proj_layers + 1):
      last = i == num_proj_layers
      out = proj_out_dim if last else dim
      layers += [nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out)]
      if not last:
        layers.append(nn.ReLU(inplace=True))
    self.head = nn.Sequential(*layers)
    self.linear = nn.Linear(dim, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = self.encoder(x)
    return self.head(h), self.linear(h.detach())


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor,
            temperature: float) -> torch.Tensor:
  """NT-Xent, 1/(2N) * sum over the 2N anchors (Chen et al. 2020a, Alg. 1)."""
  n = z_a.shape[0]
  z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
  logits = z @ z.T / temperature
  eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
  logits = logits.masked_fill(eye, -1e9)
  idx = torch.arange(n, device=z.device)
  labels = torch.cat([idx + n, idx])
  return F.cross_entropy(logits, labels)


def benchmark_step(*, depth: int, width_multiplier: float, image_size: int,
                   batch_size: int, cifar_stem: bool, num_proj_layers: int = 2,
                   proj_out_dim: int = 128, temperature: float = 0.5,
                   num_classes: int = 10, steps: int = 10, warmup: int = 2,
                   compile_step: bool = False,
                   device: str | None = None) -> dict[str, Any]:
  """Times the PyTorch SimCLR step on synthetic views already on the device.

  Returns:
    A dict with the settings, step_time_s and views_per_sec (2 views per
    image, as the JAX benchmark counts them).
  """
  device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  dev = torch.device(device)
  torch.manual_seed(0)
  net = SimCLRNet(depth, width_multiplier, cifar_stem, num_proj_layers,
                  proj_out_dim, num_classes).to(dev)
  net = net.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9,
                        weight_decay=1e-6, foreach=True)
  forward = torch.compile(net) if compile_step else net
  use_bf16 = dev.type == 'cuda'
  # Both views of the batch as one (2N, 3, S, S) batch, so BN sees both.
  x = torch.rand(2 * batch_size, 3, image_size, image_size, device=dev)
  x = x.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, num_classes, (2 * batch_size,), device=dev)

  def step() -> torch.Tensor:
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
      z, logits = forward(x)
      z = z.view(2, batch_size, -1)
      loss = nt_xent(z[0], z[1], temperature) + F.cross_entropy(
          logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def sync():
    if dev.type == 'cuda':
      torch.cuda.synchronize(dev)

  net.train()
  t0 = time.perf_counter()
  loss = step()  # First step: torch.compile's compilation, cuDNN autotuning.
  sync()
  first_s = time.perf_counter() - t0
  for _ in range(warmup):
    loss = step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t0) / steps
  return {
      'framework': 'torch', 'torch_version': torch.__version__,
      'device': str(dev),
      'device_name': (torch.cuda.get_device_name(dev) if dev.type == 'cuda'
                      else 'cpu'),
      'threads': torch.get_num_threads(),
      'compute_dtype': 'bfloat16' if use_bf16 else 'float32',
      'channels_last': True, 'compiled': compile_step,
      'optimizer': 'sgd_momentum_foreach',
      'model': f'resnet{depth}x{width_multiplier}', 'image_size': image_size,
      'global_batch': batch_size, 'first_step_s': first_s,
      'step_time_s': step_s, 'views_per_sec': 2 * batch_size / step_s,
      'final_loss': float(loss.detach()),
  }
