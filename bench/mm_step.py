r"""Stage-2 multimodal step speed on CPU: our compiled train step against
transformers' `LlavaForConditionalGeneration` + torch AdamW, same model, same
weights, same batches, same run; then the vision tower alone against
transformers' `CLIPVisionModel` (bench/vision_tower.py's two sides).

  python bench/mm_step.py [--steps=4] [--warmup=1] [--batch=8] [--text=64]
      [--threads=N] [--feature_layer=-2] [--tower_steps=4] [--attn=sdpa]
      [--parts=2] [--attention=cpu_fused] [--tower_attention=cpu_fused]
      [--loss_positions=1]

The model (one config, float32 parameters and compute):
  vision tower  configs/vision.py `small`: ViT-S/14 sized, 224 px, patch 14,
                256 patches + class token, 6 layers, width 384, 6 heads, MLP
                1536, quick-GELU; LLaVA's features (layer -2, the patches:
                256 tokens per image; ours runs 5 of the 6 blocks, which is
                all the output needs, transformers runs all 6)
  projector     mlp2x_gelu (LLaVA-1.5): 384 -> 512, GELU, 512 -> 512
  LLM           bench/train_step.py's LLaMA: 8 layers, d=512, 8 heads,
                SwiGLU 1408, vocab 8192, untied
Batch: `--batch` examples of one image each, built by the project's
`data.mm_batch.make_batch` (placeholder expanded to 256 image positions and
checked): 8 system tokens, the image, a question, an answer of `--text`/2
tokens; seq = 256 + `--text` (no padding), loss on the answer tokens only.
Random tokens and pixels, seeded; the same batches go to both sides.

Ours: the stage-2 task (`multimodal_task`, STAGE_TRAINABLE["instruct"]:
projector + LLM train, the tower frozen: no gradient, no optimizer state)
through `build_program` / `initial_state` (1-device mesh, state donated),
with bench/train_step.py's CPU settings (tuned XLA flags, `cpu_fused`
attention in tower and LLM unless `--attention` / `--tower_attention` say
`xla`, hand-written backward passes, the LLM's 8 layers
in one scan iteration, fused CPU AdamW, freed memory kept). With
`--loss_positions` below 1 our LM head runs only on each row's answer
positions (`model.loss_positions`, gathered; transformers' LLaVA projects
every position): the same loss and gradients, fewer FLOPs. Theirs: our
initial weights exported with `convert.multimodal.save_llava` and read by
`LlavaForConditionalGeneration.from_pretrained` (sdpa attention), the tower's
parameters `requires_grad=False`, `torch.optim.AdamW(fused=True)` over the
rest, loss = mean cross-entropy over the answer tokens. Both: AdamW(0.9,
0.95, eps 1e-8), no weight decay, constant rate 2e-5, clipping at global
norm 1.0 (bench/sft_step.py's optimizer). Before timing, both sides' logits
on the first batch are compared (the run stops if they differ), and the
first step's losses (same weights, same batch) are printed side by side.

Steps alternate ours/theirs; the first `--warmup` of each (compilation) are
not timed; speed is images/s from the median step. Each side's CPU
seconds per step (this process, all threads) print beside its wall time:
on a busy host the wall time also holds the waits for a core, which the CPU
time does not (it does hold the threads' spin-waits). `--parts` more rounds
then split the time: ours as separately compiled pieces (tower + projector
forward; forward + loss), theirs inside its step (forward with the tower,
backward, clip + AdamW) plus its tower + projector alone, and both sides'
LLM alone (bench/train_step.py's text-only steps, same LLaMA, same tokens,
every target weighted). The tower alone
(`--tower_steps`) uses bench/vision_tower.py's functions on the same tower
config with all 6 layers and the class token (the same work on both sides).

The host line prints first; the ratios print last, each marked NOT A RESULT
when other processes kept the machine busy while the sides were timed
(bench/host.py's OtherLoad), then the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import (OtherLoad, alternate, host_line, load_line,  # noqa: E402
                        load_verdict)
from bench.sft_step import CLIP, optimizer_config  # noqa: E402
from bench.train_step import (TUNED_XLA_FLAGS, VOCAB, configure_xla,  # noqa: E402
                              model_config)
from bench import train_step as text_step  # noqa: E402
from bench import vision_tower  # noqa: E402

IMAGE_ID = VOCAB - 1  # the last token id is `<image>`
SYSTEM_TOKENS = 8


def mm_config(seq: int, feature_layer: int, feature_select: str = "patch",
              attention: str = "cpu_fused", tower_attention: str = "cpu_fused",
              loss_positions: float = 1.0):
  """The benchmarked MultimodalConfig (see the module docstring), with the
  LLM's and the tower's attention backends and `model.loss_positions`."""
  # pylint: disable=import-outside-toplevel
  from configs.vision import projector_config, vision_config
  from mllm_jax.configlib import from_config
  from mllm_jax.modeling.multimodal import MultimodalConfig
  from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
  # pylint: enable=import-outside-toplevel
  llm = model_config(seq, scan_unroll=8, custom_vjp=True,
                     attention_backend=attention,
                     loss_positions=loss_positions)
  vision = from_config(VisionConfig, vision_config(
      "small", dtype="float32", param_dtype="float32",
      attention_backend=tower_attention, feature_layer=feature_layer,
      feature_select=feature_select), "vision")
  projector = from_config(ProjectorConfig, projector_config(
      "mlp2x_gelu", dtype="float32", param_dtype="float32"), "projector")
  cfg = MultimodalConfig(llm, vision, projector, IMAGE_ID)
  cfg.validate()
  return cfg


def make_batches(cfg, count: int, batch: int, text: int):
  """`count` batches of the schema (mm_batch.make_batch), one image and
  seq + 1 ids per example, loss weight 1 on the answer only."""
  from mllm_jax.data import mm_batch  # pylint: disable=import-outside-toplevel
  tpi, size = cfg.tokens_per_image, cfg.vision.image_size
  seq = tpi + text
  answer = text // 2
  question = seq + 1 - tpi - SYSTEM_TOKENS - answer
  rng = np.random.default_rng(0)
  out = []
  for b in range(count):
    examples = []
    for r in range(batch):
      words = lambda n: rng.integers(0, IMAGE_ID, n).tolist()
      ids = words(SYSTEM_TOKENS) + [IMAGE_ID] + words(question) + words(answer)
      weights = [0.0] * (len(ids) - answer) + [1.0] * answer
      examples.append({
          "id": f"batch{b}_row{r}", "ids": np.asarray(ids, np.int32),
          "weights": np.asarray(weights, np.float32),
          "images": rng.standard_normal((1, size, size, 3), np.float32)})
    out.append(mm_batch.make_batch(
        examples, seq_len=seq, max_images=1, image_shape=(size, size, 3),
        image_token_id=IMAGE_ID, tokens_per_image=tpi))
  return out


def torch_inputs(batch):
  """The same batch as LLaVA takes it: input ids, NCHW pixels, labels
  (-100 where the loss weight is 0) aligned with the logits."""
  import torch  # pylint: disable=import-outside-toplevel
  labels = np.where(batch["loss_weights"] > 0, batch["targets"], -100)
  return (torch.from_numpy(batch["inputs"].astype(np.int64)),
          torch.from_numpy(np.ascontiguousarray(
              batch["images"][:, 0].transpose(0, 3, 1, 2))),
          torch.from_numpy(labels.astype(np.int64)))


class Ours:
  """The stage-2 step exactly as `launch.mm_instruct` runs it (without data
  loading): `step(batch)` copies the batch in and runs the compiled step."""

  def __init__(self, cfg, total_steps: int):
    # pylint: disable=import-outside-toplevel
    import jax
    from flax import nnx
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import use_mesh
    from mllm_jax.train.compile import build_program, initial_state
    from mllm_jax.train.config import TrainConfig
    from mllm_jax.train.multimodal_task import (STAGE_TRAINABLE,
                                                multimodal_task)
    # pylint: enable=import-outside-toplevel
    self.jax, self.use_mesh = jax, use_mesh
    parallel = ParallelConfig()
    self.mesh = make_mesh(parallel)
    task = multimodal_task(cfg, trainable=STAGE_TRAINABLE["instruct"],
                           name="mm_instruct")
    self.program = build_program(task, parallel, optimizer_config(),
                                 TrainConfig(steps=total_steps), self.mesh)
    self.state, self.frozen = initial_state(self.program, seed=0)
    self.trainable = sum(x.size for x in jax.tree.leaves(self.state["params"]))
    self.frozen_count = sum(x.size for x in jax.tree.leaves(self.frozen))
    graphdef = self.program.graphdef
    merge = lambda params, frozen: nnx.merge(graphdef, params, frozen)
    self._logits = jax.jit(lambda p, f, b: merge(p, f)(
        b["inputs"], b["images"], b["image_slots"], b["positions"],
        b["segment_ids"]))
    self._tower = jax.jit(lambda p, f, images: merge(p, f).image_embeddings(
        images))

  def model(self):
    """The whole model (trained and frozen parts) as it is now."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return nnx.merge(self.program.graphdef, self.state["params"], self.frozen)

  def _put(self, batch):
    return self.jax.device_put(batch, self.program.batch_sharding)

  def logits(self, batch) -> np.ndarray:
    with self.use_mesh(self.mesh, self.program.rules):
      return np.asarray(self._logits(self.state["params"], self.frozen,
                                     self._put(batch)))

  def step(self, batch) -> float:
    batch = self._put(batch)
    with self.use_mesh(self.mesh, self.program.rules):
      self.state, out = self.program.step(self.state, self.frozen, batch)
    return float(out["loss"])  # waits for the whole step

  def tower(self, batch) -> None:
    """Tower + projector forward alone (compiled on its own)."""
    with self.use_mesh(self.mesh, self.program.rules):
      self._tower(self.state["params"], self.frozen,
                  self.jax.numpy.asarray(batch["images"])).block_until_ready()

  def forward_loss(self, batch) -> None:
    """The step's forward and loss, no gradient (the eval step)."""
    with self.use_mesh(self.mesh, self.program.rules):
      sums = self.program.eval_step(self.state["params"], self.frozen,
                                    self._put(batch))
    float(sums["loss"])


class Theirs:
  """LlavaForConditionalGeneration with our weights, the tower frozen,
  fused torch AdamW over the projector and the LLM."""

  def __init__(self, cfg, model, attn: str):
    # pylint: disable=import-outside-toplevel
    import torch
    import transformers
    from mllm_jax.convert import multimodal as mm_io
    # pylint: enable=import-outside-toplevel
    self.torch = torch
    with tempfile.TemporaryDirectory() as hf_dir:
      mm_io.save_llava(hf_dir, cfg, mm_io.pure_params(model), overwrite=True)
      self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
          hf_dir, dtype=torch.float32, attn_implementation=attn)
    self.model.train()
    named = list(self.model.named_parameters())
    for name, p in named:
      if "vision_tower" in name:
        p.requires_grad_(False)
    self.params = [p for _, p in named if p.requires_grad]
    self.trainable = sum(p.numel() for p in self.params)
    self.frozen_count = sum(p.numel() for _, p in named if not p.requires_grad)
    opt = optimizer_config()
    self.adamw = torch.optim.AdamW(
        self.params, lr=opt.learning_rate, betas=(opt.b1, opt.b2),
        eps=opt.eps, weight_decay=opt.weight_decay, fused=True)
    self.vocab = cfg.model.vocab_size
    self.parts = []

  def logits(self, batch) -> np.ndarray:
    ids, pixels, _ = torch_inputs(batch)
    with self.torch.no_grad():
      return self.model(input_ids=ids, pixel_values=pixels,
                        use_cache=False).logits.numpy()

  def step(self, batch) -> float:
    torch = self.torch
    start = time.perf_counter()
    ids, pixels, labels = torch_inputs(batch)
    logits = self.model(input_ids=ids, pixel_values=pixels,
                        use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, self.vocab), labels.reshape(-1), ignore_index=-100)
    forward = time.perf_counter()
    self.adamw.zero_grad(set_to_none=True)
    loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(self.params, CLIP)
    self.adamw.step()
    end = time.perf_counter()
    self.parts.append({"forward (tower included) + loss": forward - start,
                       "backward": backward - forward,
                       "clip + adamw": end - backward})
    return loss.item()

  def tower(self, batch) -> None:
    """Tower + projector forward alone."""
    _, pixels, _ = torch_inputs(batch)
    with self.torch.no_grad():
      self.model.model.get_image_features(pixel_values=pixels)


def median_speed(times: list[float], images: int) -> tuple[float, float]:
  median = statistics.median(times)
  return median, images / median


def main() -> None:
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4,
                      help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed steps per side first")
  parser.add_argument("--batch", type=int, default=8,
                      help="examples (one image each) per step")
  parser.add_argument("--text", type=int, default=64,
                      help="text tokens per example (seq = 256 + text)")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--feature_layer", type=int, default=-2,
                      help="vision.feature_layer of the step's model "
                      "(LLaVA's -2; -1 makes ours run all 6 blocks too)")
  parser.add_argument("--tower_steps", type=int, default=4,
                      help="timed batches per side of the tower alone "
                      "(0: skip)")
  parser.add_argument("--parts", type=int, default=2,
                      help="rounds of the time split after the steps (0: "
                      "skip)")
  parser.add_argument("--attention", default="cpu_fused",
                      choices=("cpu_fused", "xla"),
                      help="the LLM's model.attention_backend")
  parser.add_argument("--tower_attention", default="cpu_fused",
                      choices=("cpu_fused", "xla"),
                      help="the tower's vision.attention_backend (also in "
                      "the tower-alone comparison)")
  parser.add_argument("--loss_positions", type=float, default=1.0,
                      help="our model.loss_positions: the LM head on each "
                      "row's answer positions only (gathered) when below 1")
  parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                      help="transformers attention implementation")
  parser.add_argument("--xla_flags", default=TUNED_XLA_FLAGS,
                      help="extra XLA_FLAGS for our side ('' for XLA's "
                      "defaults)")
  args = parser.parse_args()
  configure_xla(args.threads, args.xla_flags)
  # pylint: disable=import-outside-toplevel
  from mllm_jax.runtime import keep_freed_memory
  keep_freed_memory()
  import jax
  import torch
  import transformers
  # pylint: enable=import-outside-toplevel
  torch.set_num_threads(args.threads)

  seq = 256 + args.text
  cfg = mm_config(seq, args.feature_layer, attention=args.attention,
                  tower_attention=args.tower_attention,
                  loss_positions=args.loss_positions)
  total = args.warmup + args.steps
  batches = make_batches(cfg, total, args.batch, args.text)
  first = batches[0]
  answer_tokens = int(first["loss_weights"].sum())
  image_positions = int((first["image_slots"] >= 0).sum())

  ours = Ours(cfg, total)
  theirs = Theirs(cfg, ours.model(), args.attn)
  want, got = theirs.logits(first), ours.logits(first)
  logit_err = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"{jax.devices()[0].platform} x{jax.device_count()}, {args.threads} "
        f"threads, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; float32; tower {cfg.vision.image_size}"
        f" px / patch {cfg.vision.patch_size} / {cfg.vision.num_layers} "
        f"layers (feature layer {cfg.vision.feature_layer}: ours runs "
        f"{cfg.vision.layers_run}, transformers "
        f"{cfg.vision.num_layers}) / width {cfg.vision.embed_dim}, "
        f"mlp2x_gelu, LLaMA {cfg.model.num_layers} layers d="
        f"{cfg.model.embed_dim} vocab {cfg.model.vocab_size}; batch "
        f"{args.batch} x seq {seq} ({cfg.tokens_per_image} image positions "
        f"per row, {answer_tokens} answer tokens with loss in the first "
        f"batch, {image_positions} image positions), {args.warmup} warm-up "
        f"+ {args.steps} timed steps each; attention: LLM "
        f"{cfg.model.attention_backend}, tower "
        f"{cfg.vision.attention_backend}, transformers {args.attn}; our LM "
        f"head on {cfg.model.loss_positions:g} of each row's positions; XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
  print(f"trainable: ours {ours.trainable:,} (frozen {ours.frozen_count:,}),"
        f" transformers {theirs.trainable:,} (frozen "
        f"{theirs.frozen_count:,})")
  print(f"same weights: max |logits ours - transformers| / max |logits| on "
        f"the first batch {logit_err:.1e}", flush=True)
  if logit_err > 1e-4 or ours.trainable != theirs.trainable:
    raise SystemExit("the two sides do not compute the same model; "
                     "nothing timed")

  others = OtherLoad()
  start = time.perf_counter()
  cpu = {}
  times, losses = alternate(
      {"mllm_jax": lambda i: ours.step(batches[i]),
       "transformers": lambda i: theirs.step(batches[i])},
      total, args.warmup, cpu)
  others_cores = others.cores()
  print(f"first step (same weights, same batch) loss: mllm_jax "
        f"{losses['mllm_jax'][0]:.5f}, transformers "
        f"{losses['transformers'][0]:.5f}; the alternating steps took "
        f"{time.perf_counter() - start:.0f} s, other processes kept "
        f"{others_cores:.2f} cores busy on average meanwhile")
  speed = {}
  for name in times:
    median, speed[name] = median_speed(times[name], args.batch)
    print(f"{name}: median {median:.3f} s/step (min {min(times[name]):.3f})"
          f", {speed[name]:.2f} images/s, {statistics.median(cpu[name]):.2f}"
          f" CPU s/step, loss {losses[name][0]:.4f} -> "
          f"{losses[name][-1]:.4f}", flush=True)

  if args.parts:
    # The same LLM alone, text only (bench/train_step.py's two sides: every
    # target weighted), on the batches' tokens with the image positions as
    # they are: how much of each step is the LLM's.
    tokens = [np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
              for b in batches]
    llm_ours, llm_weights = text_step.build_ours(
        cfg.model, optimizer_config(), args.parts + 1)
    llm_theirs = text_step.build_theirs(
        cfg.model, optimizer_config(), args.parts + 1, llm_weights, args.attn)
    split_cpu = {}
    split, _ = alternate(
        {"ours tower+projector": lambda i: ours.tower(batches[i]),
         "ours forward+loss": lambda i: ours.forward_loss(batches[i]),
         "ours LLM-only step": lambda i: llm_ours(tokens[i]),
         "theirs tower+projector": lambda i: theirs.tower(batches[i]),
         "theirs LLM-only step": lambda i: llm_theirs(tokens[i]),
         "theirs step": lambda i: theirs.step(batches[i])},
        args.parts + 1, 1, split_cpu)
    timed = theirs.parts[-args.parts:]
    print("time split (medians of " + str(args.parts) + " rounds, wall s "
          "(CPU s)): " + ", ".join(
              f"{k} {statistics.median(v):.3f} "
              f"({statistics.median(split_cpu[k]):.2f})"
              for k, v in split.items() if k != "theirs step")
          + "; theirs inside the step: " + ", ".join(
              f"{k} {statistics.median(p[k] for p in timed):.3f}"
              for k in timed[0]), flush=True)

  tower_ratio, tower_cores = None, 0.0
  if args.tower_steps:
    tower_cfg = mm_config(seq, -1, "cls_patch",
                          tower_attention=args.tower_attention).vision
    tower_ours, tower_model = vision_tower.build_ours(tower_cfg)
    tower_theirs = vision_tower.build_theirs(tower_model, args.attn)
    rng = np.random.default_rng(1)
    rounds = args.warmup + args.tower_steps
    nchw = [rng.standard_normal((args.batch, 3, tower_cfg.image_size,
                                 tower_cfg.image_size), np.float32)
            for _ in range(rounds)]
    nhwc = [np.ascontiguousarray(x.transpose(0, 2, 3, 1)) for x in nchw]
    diff = np.abs(tower_ours(nhwc[0]) - tower_theirs(nchw[0])).max()
    others.start()
    tower_cpu = {}
    tower_times, _ = alternate(
        {"mllm_jax": lambda i: tower_ours(nhwc[i]),
         "transformers": lambda i: tower_theirs(nchw[i])},
        rounds, args.warmup, tower_cpu)
    tower_cores = others.cores()
    print(f"vision tower alone (bench/vision_tower.py's sides: all "
          f"{tower_cfg.num_layers} layers, class token + patches, attention"
          f" {tower_cfg.attention_backend} vs CLIPVisionModel {args.attn}, "
          f"batch {args.batch}, {args.warmup} warm-up + {args.tower_steps} "
          f"timed each): max |ours - transformers| {diff:.1e}; other "
          f"processes kept {tower_cores:.2f} cores busy on average")
    tower_speed = {}
    for name, t in tower_times.items():
      median, tower_speed[name] = median_speed(t, args.batch)
      print(f"  {name}: median {median:.3f} s/batch (min {min(t):.3f}), "
            f"{tower_speed[name]:.1f} images/s, "
            f"{statistics.median(tower_cpu[name]):.2f} CPU s/batch")
    tower_ratio = tower_speed["mllm_jax"] / tower_speed["transformers"]

  print(f"ratio (mllm_jax / transformers LLaVA), stage-2 step images/s: "
        f"{speed['mllm_jax'] / speed['transformers']:.2f}x (goal >= 1.5x)"
        + (f"  {load_verdict(others_cores)}"
           if load_verdict(others_cores) else ""))
  if tower_ratio is not None:
    print(f"ratio (mllm_jax / transformers CLIPVisionModel), tower alone "
          f"images/s: {tower_ratio:.2f}x"
          + (f"  {load_verdict(tower_cores)}"
             if load_verdict(tower_cores) else ""))


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
