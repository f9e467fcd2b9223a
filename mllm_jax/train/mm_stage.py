"""The two multimodal training stages, as values handed to the one trainer.

    stage 1, align     text checkpoint + vision tower (seeded) + fresh
                       projector; only the projector trains, on image-caption
                       pairs (plain captioning or a brief-description
                       instruction), encoder and LLM frozen.
    stage 2, instruct  stage 1's model; projector and LLM train on visual
                       questions through the VQA templates, the loss on the
                       answers only, encoder frozen.

Both read real images offline (`data.image_sets`), render conversations in a
chat format (LLaVA's `llava_v1`, or MiniGPT-4's `###Human: <Img><image></Img>
... ###Assistant:`), expand and check placeholders on the host
(`data.mm_batch`) and train `train.multimodal_task` through
`trainer.train`, so killing and restarting a run resumes it exactly. The
result is a native multimodal checkpoint with the tokenizer beside it
(WORKDIR/model), which stage 2 and `launch.convert_checkpoint` read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from mllm_jax import paths
from mllm_jax.configlib import ConfigError, check, check_choice, from_config
from mllm_jax.convert import multimodal as mm_io
from mllm_jax.convert import native
from mllm_jax.data import chat, image_sets, image_templates, images, mm_batch
from mllm_jax.data import image_readers, scenes
from mllm_jax.data.image_templates import mix_text_only
from mllm_jax.data.tokenizer import IMAGE, load_tokenizer
from mllm_jax.eval import captioning, image_tasks
from mllm_jax.eval.chat_eval import reply_metrics
from mllm_jax.generate.multimodal import MultimodalSampler
from mllm_jax.modeling import peft as peft_lib
from mllm_jax.modeling.multimodal import (MultimodalConfig, MultimodalModel,
                                          multimodal_loss)
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.train.compile import check_run, starting_model
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.finetune import base_model_config, heldout_loss
from mllm_jax.train.metrics import console
from mllm_jax.train.multimodal_task import STAGE_TRAINABLE, multimodal_task
from mllm_jax.train.trainer import train

# MiniGPT-4's format: the image between <Img> and </Img> in the human turn,
# "###" closing each message (on its own line after an answer so that it
# never merges with the answer's last punctuation into one token).
MINIGPT4 = chat.register_format(chat.TurnFormat(
    "minigpt4", system="{system}", user="###Human: {content}",
    assistant="###Assistant:", answer=" {content}", end_of_turn="\n###",
    default_system=("Give the following image: <Img>ImageContent</Img>. "
                    "You will be able to see the image once I provide it "
                    "to you. Please answer my questions.")))
MINIGPT4_IMAGE = f"<Img>{IMAGE}</Img>"
# LLaVA's stage-1 "plain" conversation: the image, the caption, a newline.
PLAIN = chat.register_format(chat.TurnFormat(
    "llava_plain", system="", user="{content}", assistant="",
    answer="{content}", end_of_turn="\n"))


def image_conversation(conv: chat.Conversation, fmt: chat.ChatFormat
                       ) -> chat.Conversation:
  """The conversation as `fmt` shows images: MiniGPT-4 wraps each
  placeholder in <Img>...</Img>; other formats leave it as it is."""
  if fmt.name != MINIGPT4.name:
    return conv
  turns = tuple(t if t.role != chat.USER else chat.Turn(
      t.role, t.content.replace(IMAGE, MINIGPT4_IMAGE), t.input)
                for t in conv.turns)
  return chat.Conversation(conv.id, turns, conv.system, conv.images)


def check_overrides(stage: str, overrides) -> None:
  """Stage 2 takes the tower's and projector's architecture from its
  init_checkpoint, so a `--config.vision.*` / `--config.projector.*`
  override of anything but their run fields would be ignored: refuse it by
  name. `overrides`: the dotted fields set on the command line."""
  if stage != "instruct":
    return
  parts = {"vision": ("vision tower", VisionConfig),
           "projector": ("projector", ProjectorConfig)}
  for field in sorted(overrides):
    part, _, name = field.partition(".")
    what, cls = parts.get(part, ("", None))
    if cls is not None and name not in cls.run_fields:
      raise ConfigError(
          f"{field}: stage 2 takes the {what} from init_checkpoint (set it "
          f"in stage 1, launch.mm_align); here only "
          f"{', '.join(f'{part}.{f}' for f in cls.run_fields)} apply")


def _run_choices(part, section):
  """`part` (from a checkpoint) with the run fields of config `section`."""
  return dataclasses.replace(part, **{k: section[k] for k in part.run_fields})


def model_config(config, tokenizer) -> MultimodalConfig:
  """Stage 1: the text checkpoint's decoder with this run's choices, the
  config's tower and projector. Stage 2: the stage-1 checkpoint's three
  parts with this run's choices (`run`, and the run fields of `vision` and
  `projector`)."""
  run = {k: v for k, v in config.run.to_dict().items() if k != "dtype" or v}
  if config.stage == "instruct":
    if not mm_io.is_multimodal(config.init_checkpoint):
      raise ConfigError(
          f"init_checkpoint: {config.init_checkpoint} holds no "
          f"{mm_io.CONFIG_FILE}; stage 2 starts from stage 1's WORKDIR/model "
          f"(launch.mm_align) or a converted LLaVA")
    cfg = mm_io.read_config(config.init_checkpoint, **run)
    cfg = dataclasses.replace(
        cfg, vision=_run_choices(cfg.vision, config.vision),
        projector=_run_choices(cfg.projector, config.projector),
        bidirectional_images=config.bidirectional_images)
  else:
    model = base_model_config(config.init_checkpoint, config.run.to_dict())
    try:
      image_id = tokenizer.special_token_id(IMAGE)
    except KeyError as e:
      raise ConfigError(f"init_checkpoint: {e}; train the tokenizer with "
                        f"the special tokens (launch.train_tokenizer)") from e
    cfg = MultimodalConfig(
        model, from_config(VisionConfig, config.vision, "vision"),
        from_config(ProjectorConfig, config.projector, "projector"),
        image_id, config.bidirectional_images)
  cfg.validate()
  return cfg


def read_examples(config, cfg: MultimodalConfig, tokenizer, fmt
                  ) -> tuple[list, list, dict]:
  """(train, held-out) prepared examples of this stage, and the counts of
  what was read, kept and dropped (and why)."""
  data = config.data
  sets = image_sets.ImageSetsConfig(
      caption_sources=tuple(data.caption_sources),
      caption_kind=data.caption_kind, vqa_sources=tuple(data.vqa_sources),
      scene=scenes.SceneConfig(
          **{**data.scene.to_dict(),
             "object_scale": tuple(data.scene.object_scale),
             "seed": data.seed}),
      stamp_categories=tuple(data.stamp_categories),
      train_scenes=data.train_scenes, test_scenes=data.test_scenes,
      seed=data.seed)
  sets.validate("data")
  stats = chat.ChatStats()
  question_types, baselines = {}, {}
  if config.stage == "align":
    train_raw, held_raw = image_sets.caption_split(sets, stats)
  else:
    train_items, test_items = image_sets.vqa_items(sets, stats)
    if data.question_types:
      keep = lambda items: [i for i in items
                            if i.question_type in data.question_types]
      train_items, test_items = keep(train_items), keep(test_items)
      check(bool(train_items and test_items), "data.question_types",
            f"{tuple(data.question_types)} keeps no question of "
            f"{tuple(data.vqa_sources)}")
    order = np.random.default_rng(data.seed)
    pick = lambda items, n: [items[i] for i in sorted(order.permutation(
        len(items))[:n or len(items)])]
    train_items = pick(train_items, data.max_examples)
    test_items = pick(test_items, data.eval_examples)
    question_types = {item.id: item.question_type for item in test_items}
    train_raw = image_templates.vqa_examples(train_items, data.seed,
                                             stats=stats)
    held_raw = image_templates.vqa_examples(test_items, data.seed,
                                            stats=stats)
  image_cfg = images.ImageConfig(size=cfg.vision.image_size)

  fit = dict(max_len=config.seq_len + 1, image_token_id=cfg.image_token_id,
             tokens_per_image=cfg.tokens_per_image)

  def prepare(raw, limit):
    """Encoded, placeholders expanded and checked, fitted to a row once
    (so what truncation drops is counted here, not batch after batch)."""
    out = []
    for ex in raw:
      ex = images.ImageExample(ex.id, image_conversation(ex.conversation,
                                                         fmt), ex.images)
      try:
        record = images.prepare(ex, image_cfg, stats, tokenizer, fmt)
      except chat.ChatFormatError as e:
        stats.add(chat.readers.Drop("format_shift", str(e)[:200]))
        continue
      if record is not None:
        record = mm_batch.fit_to_row(mm_batch.expand_placeholders(
            record, cfg.image_token_id, cfg.tokens_per_image),
                                     stats=stats, **fit)
      if record is not None:
        out.append(record)
      if limit and len(out) >= limit:
        break
    return out

  train_examples = prepare(train_raw, data.max_examples)
  held_out = prepare(held_raw, data.eval_examples)
  if config.stage == "instruct" and data.instruction_files:
    train_examples += _instruction_examples(data.instruction_files, prepare,
                                            stats)
  if question_types:  # what VQA accuracy is compared with, per type
    for record in held_out:
      record["question_type"] = question_types[record["id"]]
    kept = {record["id"] for record in held_out}
    baselines = image_sets.answer_baselines(
        train_items, [item for item in test_items if item.id in kept])
  summary = stats.summary()
  check(bool(train_examples), "seq_len" if summary["dropped"].get(
      "no_answer_after_truncation") else "data",
        f"no usable training example ({summary})")
  if data.text_mix:
    train_examples = _mix_text(config, train_examples, tokenizer, fmt,
                               image_cfg, stats)
    summary = stats.summary()
  console(f"{config.stage}: {len(train_examples):,} training ("
          f"{summary['notes'].get('text_only_examples', 0)} text-only) and "
          f"{len(held_out):,} held-out examples; dropped "
          f"{summary['dropped'] or 'none'}")
  if baselines:
    summary["answer_baselines"] = baselines
  return train_examples, held_out, summary


def _instruction_examples(files: str, prepare, stats: chat.ChatStats
                          ) -> list:
  """Stage 2's `data.instruction_files`: conversation JSONL with images as
  files beside it (what launch.generate_visual_instructions writes), all of
  it, after the VQA examples (data.max_examples limits those only)."""
  raw = list(image_readers.read_folder(files, stats=stats))
  check(bool(raw), "data.instruction_files",
        f"no usable record in {files!r} ({stats.summary()['dropped']})")
  out = prepare(raw, 0)
  stats.note("instruction_examples", len(out))
  return out


def _mix_text(config, image_examples: list, tokenizer, fmt, image_cfg,
              stats: chat.ChatStats):
  """Text-only conversations (`data.text_files`, default the ShareGPT dump)
  joined to the image examples by `data.text_mix` ("random": in the same
  batches, LaVIN's way; "sequential": all text first, MultiInstruct's)."""
  data = config.data
  mix = image_templates.TextMixConfig(data.text_mix, data.text_fraction,
                                      data.seed)
  mix.validate("data")
  want = max(1, round(len(image_examples) * data.text_fraction
                      / (1 - data.text_fraction)))
  texts = []
  for conv in chat.read_conversations(data.text_files or paths.sharegpt_json(),
                                      "auto", stats):
    if conv.num_images:
      continue
    try:
      record = chat.encode(conv, tokenizer, fmt, config.seq_len + 1,
                           "rounds", stats)
    except chat.ChatFormatError as e:
      stats.add(chat.readers.Drop("format_shift", str(e)[:200]))
      continue
    if record is not None:
      texts.append({"id": conv.id, **record, "images": np.zeros(
          (0, image_cfg.size, image_cfg.size, 3), np.float32)})
    if len(texts) >= want:
      break
  check(bool(texts), "data.text_files", "no usable text-only conversation")
  stats.note("text_only_examples", len(texts))
  return mix_text_only(image_examples, texts, mix)


def batch_args(config, cfg: MultimodalConfig) -> dict[str, Any]:
  size = cfg.vision.image_size
  return dict(seq_len=config.seq_len, max_images=config.data.max_images,
              image_shape=(size, size, cfg.vision.num_channels),
              image_token_id=cfg.image_token_id,
              tokens_per_image=cfg.tokens_per_image)


def start_weights(config, cfg: MultimodalConfig):
  """The task's load_weights: stage 1 restores only the decoder from the
  text checkpoint (tower and projector keep their seeded values); stage 2
  restores everything from its multimodal checkpoint."""
  path = config.init_checkpoint
  if config.stage == "instruct":  # LoRA adapters keep their initialisation
    return lambda targets: mm_io.restore_params(
        path, peft_lib.without_adapters(targets))
  native.check_architecture(path, cfg.model, "init_checkpoint")
  return lambda targets: {"decoder": native.restore_params(
      path, targets["decoder"])}


def evaluate(config, model, tokenizer, fmt, held_out: list,
             eval_batches: list, stage: str, mesh=None, rules=None
             ) -> dict[str, Any]:
  """What a stage shows on its held-out examples, for one model.

  Both stages: the held-out loss on the answers (captions / VQA answers)
  with the images and with every image zeroed (does the loss use the
  image?), and greedy replies to the first `eval.limit` examples with
  their end-of-turn rate (none with eval.limit=0). Stage 1 adds captioning metrics of the replies
  against the held-out captions; stage 2 VQA accuracy per question type,
  also with the images zeroed.
  """
  loss = multimodal_loss()
  zeroed = [dict(b, images=np.zeros_like(b["images"])) for b in eval_batches]
  out: dict[str, Any] = {
      "loss": heldout_loss(model, eval_batches, loss),
      "loss_zero_images": heldout_loss(model, zeroed, loss)}
  records = held_out[:config.eval.limit]
  if not records:  # eval.limit=0: the losses only
    return out
  sampler = MultimodalSampler(model, tokenizer, mesh, rules,
                              pad_id=max(tokenizer.pad_id, 0),
                              prompt_multiple=32)
  ask = lambda zero: image_tasks.answer_images(
      sampler, tokenizer, fmt, records, config.eval.max_new_tokens,
      zero_images=zero)
  replies = ask(False)
  references = [image_tasks.reference_of(r) for r in records]
  out["replies"] = dict(reply_metrics(replies), count=len(records))
  if stage == "instruct":
    types = [r["question_type"] for r in records]
    out["vqa"] = image_tasks.vqa_accuracy([r.text for r in replies],
                                          references, types)
    out["vqa_zero_images"] = image_tasks.vqa_accuracy(
        [r.text for r in ask(True)], references, types)
  else:
    out["captions"] = captioning.caption_metrics(
        {r["id"]: [ref] for r, ref in zip(records, references)},
        {r["id"]: reply.text for r, reply in zip(records, replies)}
    ).summary()
  out["examples"] = [
      {"id": r["id"], "prompt": r["conversation"].turns[0].content,
       "reference": ref, "reply": reply.text}
      for r, ref, reply in list(zip(records, references, replies))[:6]]
  return out


def run_stage(config, workdir: str, stage: str) -> dict[str, Any]:
  """Runs stage `stage` ("align" / "instruct") in `workdir`, resuming a
  run found there; writes WORKDIR/model and WORKDIR/summary.json."""
  check_choice(config.stage, (stage,), "stage")
  tokenizer = load_tokenizer(config.init_checkpoint)
  cfg = model_config(config, tokenizer)
  parallel = from_config(ParallelConfig, config.parallel, "parallel")
  optimizer_cfg = from_config(OptimizerConfig, config.optimizer, "optimizer")
  train_cfg = from_config(TrainConfig, config.train, "train")
  peft_cfg = from_config(PeftConfig, config.peft, "peft")
  check(peft_cfg.method in ("none", "lora"), "peft.method",
        f"got {peft_cfg.method!r}; the multimodal stages take 'none' or "
        f"'lora' (LoRA on the LLM in stage 2)")
  peft_cfg.check_model(cfg.model)
  check_run(cfg.model, parallel, optimizer_cfg, train_cfg, config.seq_len,
            "seq_len")
  try:
    fmt = chat.get_format(config.data.format, tokenizer)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.format: {e}") from e
  train_examples, held_out, data_summary = read_examples(config, cfg,
                                                         tokenizer, fmt)
  args = batch_args(config, cfg)
  train_iter = mm_batch.MultimodalBatches(
      train_examples, batch_size=train_cfg.batch_size, seed=config.data.seed,
      shuffle=config.data.text_mix != "sequential", **args)
  eval_batches = [
      mm_batch.make_batch(held_out[i:i + train_cfg.batch_size]
                          + [None] * max(0, i + train_cfg.batch_size
                                         - len(held_out)), **args)
      for i in range(0, len(held_out), train_cfg.batch_size)]
  trainable = tuple(config.trainable) or STAGE_TRAINABLE[stage]
  task = dataclasses.replace(
      multimodal_task(cfg, trainable=trainable,
                      peft=peft_cfg, seed=config.seed, name=f"mm_{stage}"),
      load_weights=start_weights(config, cfg),
      weights_source=config.init_checkpoint)
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = make_mesh(parallel), tuple(parallel.rules)
  measure = lambda model: evaluate(config, model, tokenizer, fmt, held_out,
                                   eval_batches, stage, mesh, rules)

  # ------------------------------------------------------------------ before
  before_file = os.path.join(workdir, "before.json")
  if not os.path.exists(before_file):
    # Without adapters: LoRA starts as the identity, and the merged model
    # is what "after" measures.
    plain = dataclasses.replace(task, build_model=lambda rngs: (
        MultimodalModel(cfg, rngs)))
    before = measure(starting_model(plain, mesh, rules, config.seed))
    if jax.process_index() == 0:
      with open(before_file, "w") as f:
        json.dump(before, f, indent=2, default=float)
  before = json.load(open(before_file))

  # ------------------------------------------------------------------ train
  last, model = train(task, parallel, optimizer_cfg, train_cfg, config.seed,
                      workdir, train_iter, eval_batches)
  model_dir = os.path.join(workdir, "model")
  params = mm_io.pure_params(model)
  if peft_cfg.method == "lora":  # the LLM with its adapters merged in
    merged = peft_lib.merge_lora(model.decoder)
    cfg = dataclasses.replace(cfg, model=merged.cfg)
    params["decoder"] = nnx.to_pure_dict(nnx.state(merged))
  mm_io.save_model(model_dir, cfg, params, overwrite=True)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(config.init_checkpoint, "tokenizer*")):
      shutil.copy(path, model_dir)
  del model

  # ------------------------------------------------------------------ after
  run = {k: v for k, v in config.run.to_dict().items() if k != "dtype" or v}
  after = measure(mm_io.load_model(model_dir, mesh, rules, **run)[1])
  summary = {"stage": stage, "base": config.init_checkpoint,
             "format": fmt.name, "tokens_per_image": cfg.tokens_per_image,
             "peft": peft_cfg.method, "trainable": list(trainable),
             "train_examples": len(train_examples),
             "text_mix": config.data.text_mix,
             "held_out_examples": len(held_out), "data": data_summary,
             "batches": train_iter.stats.summary(), "last": last,
             "before": before, "after": after}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
  console(report_line(stage, before, after))
  return summary


def report_line(stage: str, before: dict, after: dict) -> str:
  """One line of what moved: held-out loss (and with zeroed images), and
  VQA accuracy or CIDEr-D."""
  line = (f"{stage}: held-out loss {before['loss']:.3f} -> "
          f"{after['loss']:.3f} (images zeroed: "
          f"{after['loss_zero_images']:.3f})")
  if "replies" not in after:
    return line
  if "vqa" in after:
    line += (f"; VQA accuracy {before['vqa']['all']['accuracy']:.1%} -> "
             f"{after['vqa']['all']['accuracy']:.1%} (images zeroed: "
             f"{after['vqa_zero_images']['all']['accuracy']:.1%})")
  else:
    line += (f"; CIDEr-D {before['captions']['CIDEr-D']:.3f} -> "
             f"{after['captions']['CIDEr-D']:.3f}")
  return line
