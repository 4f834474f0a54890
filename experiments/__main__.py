from experiments import jax_cache
from experiments.cli import main

jax_cache.enable()  # compiled programs are reused by the next run (BILEVEL_JAX_NO_CACHE=1: off)
raise SystemExit(main())
