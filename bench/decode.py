r"""Greedy decoding speed: our compiled KV-cache sampler vs HF transformers'
`generate`, same weights, same CPU, same run.

  JAX_PLATFORMS=cpu python bench/decode.py [--new_tokens=128] [--prompt_len=32]

The model is a random LlamaForCausalLM (8 layers, d=512, 8 heads, SwiGLU
1408, vocab 8192) converted to a native checkpoint; both sides compute in
float32 with the same thread count. Tokens/s counts new tokens (prefill
included in the time) after one warm-up call each; the ratio prints last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402


def main() -> None:
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--torch_device", default="cpu",
                      help="'cuda' to compare on a GPU (JAX picks its own)")
  args = parser.parse_args()

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  import jax  # pylint: disable=import-outside-toplevel
  from mllm_jax.convert import hf, native  # pylint: disable=import-outside-toplevel
  from mllm_jax.generate.sampler import Sampler  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=8192, hidden_size=512, intermediate_size=1408,
      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
      max_position_embeddings=1024)
  reference = transformers.LlamaForCausalLM(config).eval()
  reference.generation_config.eos_token_id = None
  reference.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as tmp:
    reference.save_pretrained(os.path.join(tmp, "hf"))
    hf.hf_to_native(os.path.join(tmp, "hf"), os.path.join(tmp, "native"),
                    dtype="float32")
    cfg, model = native.load_model(os.path.join(tmp, "native"))
  sampler = Sampler(model)
  reference.to(args.torch_device)
  print(f"jax: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"torch: {args.torch_device}, torch threads {threads}, model "
        f"{cfg.num_layers}L d={cfg.embed_dim} vocab {cfg.vocab_size}, "
        f"{args.new_tokens} new tokens, prompt {args.prompt_len}, greedy, "
        f"float32")

  rng = np.random.RandomState(0)
  ratios = {}
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = rng.randint(3, 8192, (batch, args.prompt_len))

    def ours():
      return sampler.generate(prompts.tolist(), args.new_tokens).tokens

    def theirs():
      ids = torch.tensor(prompts, device=args.torch_device)
      with torch.no_grad():
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False)
      return out[:, args.prompt_len:].tolist()

    timings = {}
    for name, fn in (("mllm_jax", ours), ("transformers", theirs)):
      result = fn()  # warm-up (compiles ours)
      best = float("inf")
      for _ in range(args.repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
      timings[name] = (batch * args.new_tokens / best, result)
    same = np.mean(np.asarray(timings["mllm_jax"][1]) ==
                   np.asarray(timings["transformers"][1]))
    ratios[batch] = timings["mllm_jax"][0] / timings["transformers"][0]
    print(f"batch {batch}: mllm_jax {timings['mllm_jax'][0]:.1f} tok/s, "
          f"transformers {timings['transformers'][0]:.1f} tok/s, "
          f"same greedy tokens {same:.1%}")
  print("ratio (mllm_jax / transformers): " + ", ".join(
      f"batch {b}: {r:.2f}x" for b, r in ratios.items()))


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
