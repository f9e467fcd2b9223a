"""TPU launch presets: `python -m launch.tpu.launch --config=configs/tpu.py:NAME`.

  7b-v5p-8         LLaMA-7B pretraining on one v5p-8 VM (4 chips, 1 host)
  65b-v5p-256      LLaMA-65B pretraining on a v5p-256 pod slice (128 chips,
                   32 hosts), the `65b-pod` mesh (fsdp 32 x tensor 4)
  65b-2xv5p-256    the same model on two v5p-256 slices (multislice): data=2
                   across the slices, fsdp x tensor inside each
  tiny-v5litepod-8 the tiny preset on one v5e VM: a cheap end-to-end check

The accelerator and meshes follow the ahead-of-time compiles in
docs/scale.md. `args` may use {data_dir} (where the bucket is mounted or
copied on every worker) and {name} (--name). Data: token shards under
BUCKET/tokens/<source>/*.tokens.npy as configs/mixtures.py lays them out,
with the tokenizer at BUCKET/tokens/tokenizer.model; runs write to
BUCKET/runs/<name> through the mount, which every host of a pod sees.
Every field can be overridden (`--config.num_slices=4`).
"""

import ml_collections

from configs.mixtures import llama_mixture


def _literal(value) -> str:
  """A tuple as a Python literal with double quotes: the flag value then
  nests in the launcher's single-quoted shell words without escapes."""
  return repr(value).replace("'", '"')


def _pretrain_args(preset: str, *overrides: str) -> tuple[str, ...]:
  mix = llama_mixture(root="{data_dir}/tokens",
                      tokenizer="{data_dir}/tokens/tokenizer.model")
  return (f"--config=configs/pretrain.py:{preset}",
          "--workdir={data_dir}/runs/{name}",
          f"--config.data.sources={_literal(mix['sources'])}",
          f"--config.data.eval_sources={_literal(mix['eval_sources'])}",
          f"--config.data.tokenizer={mix['tokenizer']}", *overrides)


# preset -> (accelerator type, slices, pretraining preset, its overrides)
PRESETS = {
    "7b-v5p-8": ("v5p-8", 1, "7b", ()),
    "65b-v5p-256": ("v5p-256", 1, "65b-pod", ()),
    # 256 chips: data 2 (one per slice, over the data-centre network) x
    # fsdp 32 x tensor 4; half the accumulation keeps 4 sequences per shard.
    "65b-2xv5p-256": ("v5p-256", 2, "65b-pod",
                      ("--config.parallel.data=2",
                       "--config.train.grad_accum_steps=8")),
    "tiny-v5litepod-8": ("v5litepod-8", 1, "tiny",
                         ("--config.model.attention_backend=xla",
                          "--config.optimizer.backend=optax")),
}


def get_config(name: str = "7b-v5p-8") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown TPU launch preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  accelerator, slices, pretrain, overrides = PRESETS[name]
  c = ml_collections.ConfigDict()
  c.accelerator_type = accelerator
  c.runtime_version = ""  # '' = the generation's default (launch/tpu/accelerators.py)
  c.num_slices = slices   # > 1: multislice through a queued resource
  c.queued = slices > 1   # a queued resource even for one slice
  c.provisioning = ""     # '', 'spot' or 'reserved'
  c.source = "local"      # 'local' (this tree, git archive HEAD) or 'git+URL[@REF]'
  c.extras = "tpu"        # pip extras installed on every worker
  # Sample data fetched on every worker at install (scripts/fetch_data.py
  # --only ...): the tiny preset builds its data from the Shakespeare plays.
  c.fetch = ("shakespeare",) if pretrain == "tiny" else ()
  c.data = ml_collections.ConfigDict(dict(
      bucket="",          # gs://BUCKET[/PATH]; required by the data step
      mode="mount",       # 'mount' (gcsfuse) or 'copy' (gcloud storage cp)
      dir="/gcs"))        # where it appears on every worker
  c.binary = "launch.pretrain"
  if pretrain == "tiny":
    c.args = ("--config=configs/pretrain.py:tiny",
              "--workdir={data_dir}/runs/{name}", *overrides)
  else:
    c.args = _pretrain_args(pretrain, *overrides)
  c.env = ()              # extra 'KEY=VALUE' set for the binary on every worker
  c.log = "~/mllm_jax_run.log"  # each worker's copy of the binary's output
  c.detach = False        # True: start under nohup and return (long runs)
  c.lock()
  return c
