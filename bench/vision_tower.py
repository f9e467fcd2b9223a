r"""Vision-tower speed on CPU: our jitted ViT forward vs transformers'
CLIPVisionModel on torch, same weights, same images, same run.

  JAX_PLATFORMS=cpu python bench/vision_tower.py [--preset=small]
      [--batch=8] [--steps=10] [--warmup=2] [--threads=N]
      [--attention=xla] [--attn=sdpa] [--feature_layer=-1]

The tower is a preset of configs/vision.py (default `small`: ViT-S/14 sized,
224 px, 257 tokens, 6 layers of width 384), float32 parameters and
compute. Ours is `VisionEncoder` under jax.jit (one CPU device); theirs is
CLIPVisionModel in eval mode under torch.inference_mode, loaded with our
randomly initialised weights exported through convert.vision (their output
is checked against ours before timing). Both return the last layer's hidden
states by default (`--feature_layer=-2`, LLaVA's choice, lets ours skip the
last block while transformers runs every block; not the default because the
work then differs).

Batches alternate ours/theirs so both see the same machine load; the first
`--warmup` batches of each are not timed; speed is images per second from
the median batch time. The ratio ours/theirs prints last, then the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402
from bench.train_step import TUNED_XLA_FLAGS, configure_xla  # noqa: E402


def build_ours(cfg):
  """Our jitted tower. Returns (forward(images NHWC) -> numpy, model)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from flax import nnx
  from mllm_jax.modeling.vision import VisionEncoder
  # pylint: enable=import-outside-toplevel
  model = VisionEncoder(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))

  def forward(images: np.ndarray) -> np.ndarray:
    return np.asarray(run(state, images))  # waits for the result

  return forward, model


def build_theirs(model, attn: str):
  """CLIPVisionModel with our model's weights. Returns forward(images NCHW)
  -> last hidden state as numpy."""
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers
  from mllm_jax.convert import vision as convert
  # pylint: enable=import-outside-toplevel
  config = transformers.CLIPVisionConfig(
      **{k: v for k, v in convert.clip_config_to_hf(model.cfg).items()
         if k not in ("architectures", "model_type", "dtype")},
      attn_implementation=attn)
  clip = transformers.CLIPVisionModel(config).float().eval()
  clip.load_state_dict({k: torch.tensor(v) for k, v in
                        convert.clip_to_hf(model).items()}, strict=True)

  def forward(images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
      out = clip(torch.from_numpy(images), output_hidden_states=True)
    return out.hidden_states[model.cfg.feature_layer].numpy()

  return forward


def main() -> None:
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small",
                      help="a configs/vision.py preset")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10,
                      help="timed batches per side")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed batches per side first")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--attention", default="xla",
                      choices=("xla", "dot_product", "cpu_fused"),
                      help="vision.attention_backend")
  parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                      help="transformers attention implementation")
  parser.add_argument("--feature_layer", type=int, default=-1,
                      help="vision.feature_layer (ours runs blocks up to it)")
  parser.add_argument("--xla_flags", default=TUNED_XLA_FLAGS,
                      help="extra XLA_FLAGS for our side ('' for XLA's "
                      "defaults)")
  args = parser.parse_args()
  configure_xla(args.threads, args.xla_flags)

  # pylint: disable=import-outside-toplevel
  import jax
  import torch
  from flax import nnx
  from configs.vision import vision_config
  from mllm_jax.configlib import from_config
  from mllm_jax.modeling.vision_config import VisionConfig
  # pylint: enable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  cfg = from_config(VisionConfig, vision_config(
      args.preset, dtype="float32", param_dtype="float32",
      attention_backend=args.attention, feature_layer=args.feature_layer,
      feature_select="cls_patch"), "vision")
  ours, model = build_ours(cfg)
  theirs = build_theirs(model, args.attn)
  rng = np.random.default_rng(0)
  total = args.warmup + args.steps
  nchw = [rng.standard_normal((args.batch, cfg.num_channels, cfg.image_size,
                               cfg.image_size), np.float32)
          for _ in range(total)]
  nhwc = [np.ascontiguousarray(x.transpose(0, 2, 3, 1)) for x in nchw]
  diff = np.abs(ours(nhwc[0]) - theirs(nchw[0])).max()

  sides = {"mllm_jax": (ours, nhwc), "transformers": (theirs, nchw)}
  times = {name: [] for name in sides}
  for i in range(total):
    for name, (forward, images) in sides.items():
      start = time.perf_counter()
      forward(images[i])
      if i >= args.warmup:
        times[name].append(time.perf_counter() - start)

  params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  print(f"{jax.devices()[0].platform} x{jax.device_count()}, {args.threads} "
        f"threads, preset {args.preset}: {cfg.image_size} px, patch "
        f"{cfg.patch_size}, {cfg.num_patches + 1} tokens, {cfg.num_layers} "
        f"layers (ours runs {cfg.layers_run}), width {cfg.embed_dim}, "
        f"{params / 1e6:.1f}M params, batch {args.batch}, float32, attention "
        f"{cfg.attention_backend} vs transformers {args.attn}, "
        f"{args.warmup} warm-up + {args.steps} timed batches each, "
        f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
  print(f"max |ours - transformers| on the first batch: {diff:.2e}")
  speed = {}
  for name in sides:
    median = statistics.median(times[name])
    speed[name] = args.batch / median
    print(f"{name}: median {median:.3f} s/batch (min {min(times[name]):.3f})"
          f", {speed[name]:.1f} images/s")
  print(f"ratio (mllm_jax / transformers): "
        f"{speed['mllm_jax'] / speed['transformers']:.2f}x")


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
