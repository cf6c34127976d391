"""Test setup: 8 virtual CPU devices unless the caller already chose."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Keep TensorFlow and XLA from fighting over the 2 cores of a CI machine.
os.environ.setdefault('TF_NUM_INTEROP_THREADS', '1')
