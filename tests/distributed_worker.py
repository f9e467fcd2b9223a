"""One process of the two-process test in test_distributed.py.

Run as a script with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set, 4 CPU devices each; writes the loss of a batch computed
on a (2, 2, 2) mesh spanning both processes as JSON to the file named by its
first argument (not stdout, which Gloo's C++ logging shares).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from mllm_jax.modeling import Decoder  # noqa: E402
from mllm_jax.parallel.config import ParallelConfig  # noqa: E402
from mllm_jax.parallel.mesh import initialize_distributed, make_mesh  # noqa: E402
from mllm_jax.parallel.sharding import create_sharded, use_mesh  # noqa: E402
from mllm_jax.train.losses import token_cross_entropy  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

CFG = tiny_config("tiny", num_heads=8, num_kv_heads=4)
TOKENS = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 16))


def loss(model, tokens):
  return token_cross_entropy(model(tokens), jnp.roll(tokens, -1, 1)).mean()


def main():
  # Before any computation: joins the processes into one set of devices.
  assert initialize_distributed(), "expected a multi-process environment"
  parallel = ParallelConfig(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(parallel)
  model = create_sharded(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh,
                         parallel.rules)
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  # Each process supplies only the rows its devices hold.
  batch = jax.make_array_from_callback(TOKENS.shape, sharding,
                                       lambda index: TOKENS[index])
  with use_mesh(mesh, parallel.rules):
    value = jax.jit(loss)(model, batch)
  with open(sys.argv[1], "w") as f:
    json.dump({"process": jax.process_index(),
               "processes": jax.process_count(),
               "devices": jax.device_count(), "loss": float(value)}, f)


if __name__ == "__main__":
  main()
