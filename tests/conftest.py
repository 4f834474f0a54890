"""Test configuration: float64 by default, strict rank promotion, warnings as errors."""

import os

# Four CPU host devices for the sharding tests (tests/test_sharding.py). XLA
# reads the flag when JAX's CPU backend starts, so it is set before `import
# jax`; single-device code still runs on the first device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
