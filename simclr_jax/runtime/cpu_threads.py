"""Enough XLA CPU threads for several multi-device programs in flight.

XLA's CPU client runs every device's share of a program on one shared thread
pool of max(cores, devices) threads, and a collective (all-gather, all-reduce)
holds its thread while it waits for the other devices to arrive. With virtual
CPU devices (`--xla_force_host_platform_device_count=8`, how the tests and
CPU rehearsals of a sharded run work) on a 2-core machine that pool has 8
threads. JAX dispatches the next train step before the last one finishes, and
a device that runs ahead starts the next step's collectives, sometimes on
two threads at once; all 8 threads can then be waiting while a device of the
earlier step has none to run on. That rendezvous never completes, and XLA
aborts the process after 40 seconds ("Termination timeout for `all gather
...` ... Expected 8 threads to join the rendezvous"). Seen on jaxlib 0.10.2
in about one of eight short SwAV runs, and within seconds by a loop of
un-synchronised calls to a jitted function with a mean over the batch and a
replicated slice.

XLA sizes that pool from the NPROC environment variable where it is set, so
twice the device count leaves room for a step and its successor. It must be
set before JAX creates its CPU client (the first `jax.devices()` or
computation), so the package sets it on import. An NPROC the user set is kept.
"""

import os
import re
from typing import MutableMapping

_DEVICE_COUNT_FLAG = re.compile(
    r'--xla_force_host_platform_device_count=(\d+)')


def virtual_cpu_devices(environ: MutableMapping[str, str]) -> int:
  """The CPU device count the environment asks JAX for (1 if it asks none).

  The XLA flag and JAX's JAX_NUM_CPU_DEVICES both set it; the larger wins.
  """
  counts = [int(n) for n in _DEVICE_COUNT_FLAG.findall(
      environ.get('XLA_FLAGS', ''))]
  if environ.get('JAX_NUM_CPU_DEVICES', '').strip().isdigit():
    counts.append(int(environ['JAX_NUM_CPU_DEVICES']))
  return max(counts, default=1)


def reserve(environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets NPROC to twice the virtual CPU device count, unless already set.

  Does nothing for one device (no collectives) or when the cores already
  outnumber twice the devices.
  """
  if environ.get('NPROC', '').strip():
    return
  devices = virtual_cpu_devices(environ)
  if devices > 1 and 2 * devices > (os.cpu_count() or 1):
    environ['NPROC'] = str(2 * devices)
