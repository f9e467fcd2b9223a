"""Multiple-choice evaluation: log-likelihood parity with transformers on
real benchmark prompts, golden prompt strings per task family, and the
deterministic few-shot draw."""

import ast
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mllm_jax.convert import native  # noqa: E402
from mllm_jax.eval import ceval, tasks, templates  # noqa: E402
from mllm_jax.eval.scoring import Scorer  # noqa: E402
from mllm_jax.eval.templates import (ClassificationTask, Template,  # noqa: E402
                                     draw_demonstrations)
from mllm_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from tests.test_sampler import convert, hf_llama  # noqa: E402

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  reference = hf_llama(seed=1)
  path = convert(reference, tmp_path_factory.mktemp("mc"))
  return reference, native.load_model(path)[1]


def hf_continuation_logprob(model, context, continuation):
  ids = torch.tensor([context + continuation])
  with torch.no_grad():
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
  n = len(continuation)
  rows = torch.arange(len(context) - 1, len(context) - 1 + n)
  return float(logp[rows, torch.tensor(continuation)].sum())


@pytest.mark.parametrize("task, k", [
    ("piqa", 0), ("arc_easy", 1), ("hellaswag", 0), ("winogrande", 1),
    ("mmlu_astronomy", 1), ("sentiment", 2), ("boolq", 0)])
def test_continuation_loglikelihood_matches_transformers(pair, task, k):
  reference, model = pair
  examples = tasks.task_examples(task, k=k, limit=2)
  scorer = Scorer(model, batch_size=4)
  result = tasks.score_examples(scorer, TOK, examples)
  worst = 0.0
  for ex, lls in zip(examples, result["loglikelihoods"]):
    for ctx, cont, ours in zip(ex.contexts, ex.continuations, lls):
      ref = hf_continuation_logprob(reference, TOK.encode(ctx, add_bos=True),
                                    TOK.encode(cont))
      worst = max(worst, abs(ours - ref))
  print(f"{task} {k}-shot: max |ll ours - transformers| = {worst:.3g}")
  assert worst <= 1e-4
  assert 0 <= result["acc"] <= 1 and result["num_examples"] == 2


class FixedScorer:
  """Scores by a lookup, to pin acc vs acc_norm."""

  def __init__(self, values):
    self.values = values

  def score(self, requests):
    from mllm_jax.eval.scoring import Score
    return [Score(v, 1, False) for v in self.values[:len(requests)]]


def test_acc_and_length_normalised_acc():
  ex = tasks.MCExample(contexts=["Q:"] * 2, continuations=[" a", " bbbbbb"],
                       gold=1)
  # Raw sum prefers the short choice; per-character the long one wins.
  result = tasks.score_examples(FixedScorer([-2.0, -3.0]), TOK, [ex])
  assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)


# ----------------------------------------------------------------------------
# Golden prompts (synthetic documents: the strings are the contract)
# ----------------------------------------------------------------------------

DOCS = {
    "boolq": [{"passage": "Cats purr.", "question": "do cats purr",
               "answer": True},
              {"passage": "Fish swim.", "question": "can fish fly",
               "answer": False}],
    "piqa": [{"goal": "Open a jar", "sol1": "twist the lid",
              "sol2": "eat the lid", "label": 0},
             {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel",
              "label": 1}],
    "siqa": [{"context": "Sam won.", "question": "How does Sam feel?",
              "answerA": "sad", "answerB": "happy", "answerC": "bored",
              "label": "2"},
             {"context": "Ann fell.", "question": "What next?",
              "answerA": "get up", "answerB": "fly", "answerC": "sing",
              "label": "1"}],
    "hellaswag": [{"activity_label": "Baking", "ctx_a": "A man mixes flour.",
                   "ctx_b": "he", "endings": ["bakes it.", "[title] eats."],
                   "label": "0"},
                  {"activity_label": "Running", "ctx_a": "A girl runs.",
                   "ctx_b": "she", "endings": ["stops.", "flies."],
                   "label": "0"}],
    "winogrande": [{"sentence": "The cup fell off the table because _ was "
                                "tilted.", "option1": "the cup",
                    "option2": "the table", "answer": "2"},
                   {"sentence": "Tom paid Bob because _ owed money.",
                    "option1": "Tom", "option2": "Bob", "answer": "1"}],
    "arc_easy": [{"question": "What is ice?",
                  "choices": {"text": ["solid water", "gas"],
                              "label": ["A", "B"]}, "answerKey": "A"},
                 {"question": "Sun is a?",
                  "choices": {"text": ["planet", "star"],
                              "label": ["1", "2"]}, "answerKey": "2"}],
    "openbookqa": [{"question_stem": "Plants need",
                    "choices": {"text": ["light", "rocks"],
                                "label": ["A", "B"]}, "answerKey": "A"},
                   {"question_stem": "Magnets attract",
                    "choices": {"text": ["wood", "iron"],
                                "label": ["A", "B"]}, "answerKey": "B"}],
    "mmlu_astronomy": [{"question": "Closest star?", "subject": "astronomy",
                        "choices": ["Sun", "Vega", "Sirius", "Rigel"],
                        "answer": 0},
                       {"question": "Red planet?", "subject": "astronomy",
                        "choices": ["Venus", "Mars", "Earth", "Moon"],
                        "answer": 1}],
    "sentiment": [{"sentence": "a joyous film ", "label": 1},
                  {"sentence": "dull and long ", "label": 0}],
}

ZERO_SHOT = {
    "boolq": ("Cats purr.\nQuestion: do cats purr?\nAnswer:", [" no", " yes"],
              1),
    "piqa": ("Question: Open a jar\nAnswer:",
             [" twist the lid", " eat the lid"], 0),
    "siqa": ("Question: Sam won. How does Sam feel?\nAnswer:",
             [" sad", " happy", " bored"], 1),
    "hellaswag": ("Baking: A man mixes flour. He",
                  [" bakes it.", " eats."], 0),
    "winogrande": ("The cup fell off the table because the table",
                   [" was tilted."] * 2, 1),
    "arc_easy": ("Question: What is ice?\nAnswer:", [" solid water", " gas"],
                 0),
    "openbookqa": ("Plants need", [" light", " rocks"], 0),
    "mmlu_astronomy": (
        "The following are multiple choice questions (with answers) about "
        "astronomy.\n\nClosest star?\nA. Sun\nB. Vega\nC. Sirius\nD. Rigel\n"
        "Answer:", [" A", " B", " C", " D"], 0),
    "sentiment": ("a joyous film, it is", [" terrible.", " great."], 1),
}

ONE_SHOT = {  # the query is doc 0; the demonstration is doc 1 (gold filled)
    "boolq": "Fish swim.\nQuestion: can fish fly?\nAnswer: no\n\n",
    "piqa": "Question: Dry hair\nAnswer: use a towel\n\n",
    "siqa": "Question: Ann fell. What next?\nAnswer: get up\n\n",
    "hellaswag": "Running: A girl runs. She stops.\n\n",
    "winogrande": "Tom paid Bob because Tom owed money.\n\n",
    "arc_easy": "Question: Sun is a?\nAnswer: star\n\n",
    "openbookqa": "Magnets attract iron\n\n",
    "mmlu_astronomy": "Red planet?\nA. Venus\nB. Mars\nC. Earth\nD. Moon\n"
                      "Answer: B\n\n",
    "sentiment": "dull and long, it is terrible.\n",
}


@pytest.mark.parametrize("name", sorted(ZERO_SHOT))
def test_golden_prompts(name):
  task = tasks.TASKS[name]
  context, choices, gold = ZERO_SHOT[name]
  (ex,) = task.examples(DOCS[name], k=0, limit=1)
  assert ex.continuations == choices and ex.gold == gold
  assert ex.contexts[gold] == context
  (shot,) = task.examples(DOCS[name], k=1, limit=1)
  demo = ONE_SHOT[name]
  if name.startswith("mmlu"):  # the header comes once, before the demos
    header = task.header(DOCS[name][0])
    assert shot.contexts[gold] == header + demo + context[len(header):]
  else:
    assert shot.contexts[gold] == demo + context


def test_winogrande_partial_contexts_differ():
  (ex,) = tasks.TASKS["winogrande"].examples(DOCS["winogrande"], limit=1)
  assert ex.contexts == ["The cup fell off the table because the cup",
                         "The cup fell off the table because the table"]


def test_templates_prefix_and_cloze():
  cloze = Template("[X], it is [Z].")
  assert cloze.style == "cloze"
  assert cloze.split("Great film", "great") == ("Great film, it is",
                                                " great.")
  prefix = Template("Review: [X]\nSentiment: [Z]")
  assert prefix.style == "prefix"
  assert prefix.split("Bad", "negative") == ("Review: Bad\nSentiment:",
                                             " negative")
  with pytest.raises(ValueError, match="exactly one"):
    Template("no slots")
  task = ClassificationTask(cloze, ("terrible", "great"),
                            inputs=["fun", "boring", "ok"], labels=[1, 0, 1])
  ex = task.examples(k=1, seed=0)[0]
  # The one demonstration is another input, with its gold verbaliser.
  assert ex.contexts[0] in ("boring, it is terrible.\n\nfun, it is",
                            "ok, it is great.\n\nfun, it is")
  assert ex.continuations == [" terrible.", " great."]


def test_demonstrations_are_deterministic_and_exclude_the_query():
  a = [draw_demonstrations(50, 5, seed=7, index=i, exclude_self=True)
       for i in range(50)]
  b = [draw_demonstrations(50, 5, seed=7, index=i, exclude_self=True)
       for i in range(50)]
  assert a == b
  assert all(i not in picks and len(set(picks)) == 5
             for i, picks in enumerate(a))
  assert a[0] == [45, 47, 3, 28, 24]  # pinned: stable across runs/machines
  assert a != [draw_demonstrations(50, 5, seed=8, index=i, exclude_self=True)
               for i in range(50)]
  with pytest.raises(ValueError, match="pool has 3"):
    draw_demonstrations(4, 4, seed=0, index=0, exclude_self=True)


def test_mmlu_five_shot_from_dev_covers_57_subjects():
  assert len(tasks.MMLU_SUBJECTS) == 57
  (ex,) = tasks.task_examples("mmlu_abstract_algebra", k=5, limit=1)
  dev = tasks.TASKS["mmlu_abstract_algebra"].load_demos()
  assert all(d["question"].strip() in ex.contexts[0] for d in dev)
  assert ex.contexts[0].count("\nAnswer:") == 6


def test_ceval_loader(tmp_path):
  header = "id,question,A,B,C,D,answer,explanation\n"
  (tmp_path / "physics_dev.csv").write_text(
      header + "0,光速是多少?,1,2,3e8,4,C,因为\n", encoding="utf-8")
  (tmp_path / "physics_val.csv").write_text(
      header + "0,水的化学式?,H2O,CO2,O2,N2,A,\n", encoding="utf-8")
  task = ceval.ceval_task(str(tmp_path), "physics", "大学物理")
  (ex,) = task.examples(task.load(), k=1, demo_docs=task.load_demos())
  assert ex.contexts[0] == (
      "以下是中国关于大学物理考试的单项选择题，请选出其中的正确答案。\n\n"
      "光速是多少?\nA. 1\nB. 2\nC. 3e8\nD. 4\n答案：C\n\n"
      "水的化学式?\nA. H2O\nB. CO2\nC. O2\nD. N2\n答案：")
  assert ex.continuations == ["A", "B", "C", "D"] and ex.gold == 0
  (tmp_path / "bad_val.csv").write_text(header + "0,,a,b,c,d,A,\n")
  with pytest.raises(ValueError, match="question"):
    ceval.read_csv(str(tmp_path / "bad_val.csv"))


# ----------------------------------------------------------------------------
# Package structure
# ----------------------------------------------------------------------------


def _eval_imports() -> dict[str, set[str]]:
  """module -> the mllm_jax.eval modules it imports (function-level too)."""
  folder = pathlib.Path(templates.__file__).parent
  names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
  graph = {}
  for name in names:
    tree = ast.parse((folder / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "mllm_jax.eval":
          found.update(a.name for a in node.names if a.name in names)
        elif node.module.startswith("mllm_jax.eval."):
          found.add(node.module.split(".")[2])
      elif isinstance(node, ast.Import):
        found.update(a.name.split(".")[2] for a in node.names
                     if a.name.startswith("mllm_jax.eval."))
    graph[name] = found - {name}
  return graph


def test_eval_modules_import_in_one_direction():
  graph = _eval_imports()
  assert "templates" in graph["tasks"] and "tasks" not in graph["templates"]

  def cycle_from(node, path):
    if node in path:
      return path[path.index(node):] + [node]
    for nxt in sorted(graph[node]):
      found = cycle_from(nxt, path + [node])
      if found:
        return found
    return None

  for start in sorted(graph):
    assert cycle_from(start, []) is None, " -> ".join(cycle_from(start, []))
  # Names keep working from both modules their callers use.
  assert tasks.MCExample is templates.MCExample
  assert isinstance(ClassificationTask(Template("[X] is [Z]"), ("a", "b"),
                                       ["x"], [0]).examples()[0],
                    tasks.MCExample)
