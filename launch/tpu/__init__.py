"""Cloud TPU VM and pod launch: create a slice (or a queued resource, or
several slices for multislice), install the project on every worker, copy or
mount data, and run any launch binary on all workers with jax.distributed
started. `python -m launch.tpu.launch --help`; docs/scale.md, "TPU VMs and
pods". Nothing here is imported by the library."""
