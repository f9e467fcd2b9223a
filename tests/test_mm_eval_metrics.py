"""Captioning metrics (mllm_jax.eval.captioning) against coco-caption's own
scorers, and the judge-based relative score (mllm_jax.eval.judge) through a
chat-completions server on 127.0.0.1 and a scripted judge. No network."""

from __future__ import annotations

import collections
import glob
import math
import os
import random
import re
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

from mllm_jax import paths
from mllm_jax.data import instructions as ins
from mllm_jax.data.image_sources import stamp_caption
from mllm_jax.data.scenes import Scene, SceneObject
from mllm_jax.eval import captioning as cap
from mllm_jax.eval import judge as jd
from tests.test_instructions import Server

# --------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------

# COCO-like captions written for this test (punctuation, case, contractions,
# hyphens, numbers), five images.
REAL_REFS = {
    "kitchen": ["A kitchen with a stove, a sink and wooden cabinets.",
                "An old-fashioned kitchen with white appliances.",
                "A small kitchen has a stove and a sink.",
                "Wooden cabinets above a stove in a kitchen.",
                "The kitchen's counter is clean and empty."],
    "dog": ["A brown dog runs across the grass with a frisbee.",
            "A dog is running on a lawn, carrying a red frisbee!",
            "The dog catches a frisbee in a park."],
    "bus": ["A red double-decker bus drives down a city street.",
            "A double decker bus on a busy street in London.",
            "A bus is parked next to the sidewalk."],
    "cats": ["Two cats sleeping on a couch.",
             "Two cats are curled up on a sofa (both asleep).",
             "A pair of cats nap together on the couch."],
    "pizza": ["A pizza with cheese and tomatoes on a wooden table.",
              "A large pizza sits on a table next to a glass of water.",
              "Someone's dinner: a cheese pizza, cut into 8 slices."],
}
REAL_CANDS = {
    "kitchen": "a kitchen with a stove and a sink",
    "dog": "A dog running with a frisbee on the grass.",
    "bus": "a red bus on a street",
    "cats": "two cats sleeping on a couch",
    "pizza": "a plate of food on a table",
}


def tuxpaint_captions() -> dict[str, list[str]]:
  """Tux Paint's English stamp captions (real text), by stamp folder."""
  by_dir = collections.defaultdict(list)
  root = paths.tuxpaint_stamps_dir()
  for path in sorted(glob.glob(os.path.join(root, "**", "*.txt"),
                               recursive=True)):
    caption = stamp_caption(path)
    if isinstance(caption, str):
      by_dir[os.path.dirname(path)].append(caption)
  return by_dir


def coco_scores(refs_tok, cands_tok):
  """pycocoevalcap's Bleu(4), Rouge and Cider on the same tokens (joined by
  single spaces, which is what its scorers split on)."""
  gts = {k: [" ".join(r) for r in v] for k, v in refs_tok.items()}
  res = {k: [" ".join(v)] for k, v in cands_tok.items()}
  b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
  r, r_img = Rouge().compute_score(gts, res)
  c, c_img = Cider().compute_score(gts, res)
  return b, b_img, r, r_img, c, c_img


def random_set(rng: random.Random, images: int, empty_candidates: bool):
  words = ("a an the dog cat man woman red blue sits on near tree car table "
           "runs with ball grass").split()

  def sent(lo, hi):
    return [rng.choice(words) for _ in range(rng.randint(lo, hi))]
  refs = {f"img{i}": [sent(1, 12) for _ in range(rng.randint(1, 5))]
          for i in range(images)}
  cands = {k: sent(0 if empty_candidates else 1, 14) for k in refs}
  return refs, cands


def test_tokenize_ptb_style():
  assert cap.tokenize("A man's T-shirt, (red) & blue... isn't it?") == [
      "a", "man", "'s", "t-shirt", "-lrb-", "red", "-rrb-", "&", "blue",
      "is", "n't", "it"]
  assert cap.tokenize("Two dogs' toys: 3.5 balls, 1,000 sticks -- u.s. flag "
                      "at 10:30.") == [
      "two", "dogs", "toys", "3.5", "balls", "1,000", "sticks", "u.s.",
      "flag", "at", "10:30"]
  assert cap.tokenize("\u201cQuoted\u201d words; she can\u2019t\u2014won't."
                      ) == ["quoted", "words", "she", "ca", "n't", "wo", "n't"]
  assert cap.tokenize("Boom!!! Mr. Bean cannot\nstop") == [
      "boom", "!!!", "mr.", "bean", "can", "not", "stop"]
  assert cap.tokenize(" . , ; : ! ? ") == []
  assert cap.tokenize("What?! ok") == ["what", "?!", "ok"]  # as PTB: kept


@pytest.mark.skipif(shutil.which("java") is None,
                    reason="coco-caption's PTB tokeniser needs java")
def test_tokenize_equals_stanford_ptb():
  """Our tokens equal coco-caption's (Stanford CoreNLP 3.4.1 PTBTokenizer,
  lower case, its punctuation removed) on tricky captions."""
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top
  captions = [
      "A man in a t-shirt and/or jeans riding a skateboard.",
      "Mr. Smith's dog isn't on the sofa; it's on St. Mark's square.",
      "Two cats, e.g. a tabby and a black one, sleep at 3:30 p.m.",
      "A 5-year-old girl holds a 2.5 kg bag at 50% off, worth $20.",
      "The \"best\" pizza in N.Y.C. -- with cheese!",
      "A sign reads 'STOP' near the U.S. border",
      "an image of a dog\nwith a frisbee",
      "I can't see; they'd've gone. We're here, you'll see, I'm sure!",
      "The cat's toys' colours are red/blue/green.",
      "A boy (about 10) flying a kite?",
      "A US 25 cent piece ($.25) called a quarter.",
      "A European coin of 2 euros (2 \u20ac).",
      "Saturn\u2014the second largest planet\u2014and the one with rings.",
      "Boom!!!", "It's 10 o'clock, isn't it?", "Cannot stop, gonna go",
      "He met Mr. and Mrs. Jones, Jr. in town.",
      *[c for refs in REAL_REFS.values() for c in refs],
      # Every Tux Paint caption (805 distinct when measured).
      *sorted({c for v in tuxpaint_captions().values() for c in v}),
  ]
  ptb = PTBTokenizer().tokenize({i: [{"caption": c}]
                                 for i, c in enumerate(captions)})
  for i, c in enumerate(captions):
    assert " ".join(cap.tokenize(c)) == ptb[i][0], c


def test_bleu_worked_example():
  """By hand: 5 of 5 unigrams match, 3 of 4 bigrams, 2 of 3 trigrams, 1 of
  2 4-grams; candidate 5 words against a 6-word reference: BP = e^(1-6/5)."""
  refs = {"x": [["the", "cat", "sat", "on", "the", "mat"]]}
  cands = {"x": ["the", "cat", "sat", "on", "mat"]}
  b, _ = cap.bleu(refs, cands)
  bp = math.exp(1 - 6 / 5)
  assert b[0] == pytest.approx(bp * 1.0, abs=1e-9)
  assert b[1] == pytest.approx(bp * (1 * 3 / 4) ** 0.5, abs=1e-9)
  assert b[3] == pytest.approx(bp * (3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-9)


def test_matches_pycocoevalcap():
  """Corpus and per-image BLEU-1..4, ROUGE-L and CIDEr-D equal coco-caption's
  scorers on the same tokens: real-looking captions, random sets (some with
  empty candidates), one image, and a perfect candidate."""
  rng = random.Random(0)
  sets = [({k: [cap.tokenize(c) for c in v] for k, v in REAL_REFS.items()},
           {k: cap.tokenize(v) for k, v in REAL_CANDS.items()})]
  sets += [random_set(rng, rng.randint(2, 12), i % 3 == 0) for i in range(8)]
  # Real captions: each Tux Paint folder with two or more stamps is an
  # image; its first caption is the candidate, the next (up to) five the
  # references (101 images when measured).
  tux = {k: v for k, v in tuxpaint_captions().items() if len(v) >= 2}
  assert len(tux) > 50
  sets.append(({k: [cap.tokenize(c) for c in v[1:6]] for k, v in tux.items()},
               {k: cap.tokenize(v[0]) for k, v in tux.items()}))
  sets.append(({"one": [["a", "dog"], ["a", "brown", "dog"]]},
               {"one": ["a", "dog"]}))
  sets.append(({"p": [["a", "red", "bus"]], "q": [["two", "cats"]]},
               {"p": ["a", "red", "bus"], "q": ["two", "cats"]}))
  worst = 0.0
  for refs, cands in sets:
    b, b_img = cap.bleu(refs, cands)
    r, r_img = cap.rouge_l(refs, cands)
    c, c_img = cap.cider_d(refs, cands)
    cb, cb_img, cr, cr_img, cc, cc_img = coco_scores(refs, cands)
    diffs = [abs(x - y) for x, y in zip(b, cb)] + [abs(r - cr), abs(c - cc)]
    for j, k in enumerate(refs):
      diffs += [abs(b_img[k][n] - cb_img[n][j]) for n in range(4)]
      diffs += [abs(r_img[k] - cr_img[j]), abs(c_img[k] - cc_img[j])]
    worst = max(worst, *diffs)
  assert worst < 1e-9, worst
  # The real-looking set's numbers (coco scale), for docs/evaluation.md.
  scores = cap.caption_metrics(REAL_REFS, REAL_CANDS)
  s = scores.summary()
  assert s["images"] == 5 and 0 < s["BLEU-4"] < s["BLEU-1"] < 1
  assert 0 < s["CIDEr-D"] < 10 and 0 < s["ROUGE-L"] < 1
  assert set(scores.per_image["dog"]) == {"BLEU-1", "BLEU-2", "BLEU-3",
                                          "BLEU-4", "ROUGE-L", "CIDEr-D"}


def test_rouge_l_against_rouge_score_package():
  """beta=1 with one reference is rouge-score's LCS F1; coco's ROUGE-L
  (beta 1.2, best P and best R over references) is a different number."""
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  rng = random.Random(1)
  refs, cands = random_set(rng, 10, False)
  single = {k: v[:1] for k, v in refs.items()}
  _, ours = cap.rouge_l(single, cands, beta=1.0)
  for k in refs:
    theirs = scorer.score(" ".join(single[k][0]), " ".join(cands[k]))
    assert ours[k] == pytest.approx(theirs["rougeL"].fmeasure, abs=1e-12)
  coco, _ = cap.rouge_l(refs, cands)
  multi = sum(scorer.score_multi([" ".join(r) for r in refs[k]],
                                 " ".join(cands[k]))["rougeL"].fmeasure
              for k in refs) / len(refs)
  assert abs(coco - multi) > 1e-3


def test_caption_metrics_bad_input_names_the_image():
  refs = {"a": ["a dog"], "b": ["a cat"]}
  with pytest.raises(ValueError, match="without a candidate.*'b'"):
    cap.caption_metrics(refs, {"a": "a dog"})
  with pytest.raises(ValueError, match="without references.*'c'"):
    cap.caption_metrics(refs, {"a": "x", "b": "y", "c": "z"})
  with pytest.raises(ValueError, match="'b'.*non-empty list"):
    cap.caption_metrics({"a": ["a dog"], "b": []}, {"a": "x", "b": "y"})
  with pytest.raises(ValueError, match="'b'.*no token"):
    cap.caption_metrics({"a": ["a dog"], "b": ["..."]}, {"a": "x", "b": "y"})
  with pytest.raises(ValueError, match="'a'.*must be a string"):
    cap.caption_metrics({"a": ["a dog"]}, {"a": None})
  with pytest.raises(ValueError, match="no images"):
    cap.caption_metrics({}, {})
  # An empty candidate scores 0, it is not an error.
  s = cap.caption_metrics(refs, {"a": "", "b": "a cat"}).per_image["a"]
  assert s["ROUGE-L"] == 0 and s["CIDEr-D"] == 0 and s["BLEU-1"] < 1e-6


# --------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------


def scene_context() -> str:
  objects = (SceneObject("badger", "A badger.", (10, 20, 50, 60), "s1"),
             SceneObject("pig", "A Tamworth pig.", (60, 10, 100, 40), "s2"))
  return Scene("scene0", b"", 128, objects).context()


def items(n_per_cat=3):
  out = []
  for cat_name in ("counting", "position"):
    for i in range(n_per_cat):
      out.append(jd.JudgeItem(
          id=f"{cat_name}{i}", context=scene_context(),
          question=f"Question {cat_name} {i}?",
          reference=f"GOOD reference {i}",
          answer=f"{'GOOD' if i == 0 else 'BAD'} ours {i}",
          category=cat_name))
  return out


def answers_of(prompt: str) -> tuple[str, str]:
  a1 = re.search(r"\[Assistant 1\]\n(.*?)\n\[End of Assistant 1\]", prompt,
                 re.S).group(1)
  a2 = re.search(r"\[Assistant 2\]\n(.*?)\n\[End of Assistant 2\]", prompt,
                 re.S).group(1)
  return a1, a2


def biased_rating(prompt: str, bias: float = 1.0) -> str:
  """A judge that gives GOOD answers 8 and others 4, plus `bias` to
  whichever answer it sees first."""
  a1, a2 = answers_of(prompt)
  s1 = (8 if "GOOD" in a1 else 4) + bias
  s2 = 8 if "GOOD" in a2 else 4
  return f"{s1:g} {s2:g}\nAssistant 1 is {'good' if s1 > 5 else 'weak'}."


@pytest.fixture
def server(monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
              "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  s = Server()
  s.reply = lambda body: biased_rating(body["messages"][-1]["content"])
  yield s
  s.close()


def openai_judge(server, **kw):
  kw = {"timeout_s": 5.0, "max_retries": 0, "backoff_s": 0.01,
        "concurrency": 4, **kw}
  return ins.OpenAITeacher(server.url, "judge", **kw)


def test_judge_over_http_both_orders(server):
  bodies = []
  reply = server.reply

  def record(body):
    bodies.append(body)
    return reply(body)
  server.reply = record
  result = jd.judge_answers(items(), openai_judge(server), order="both",
                            batch_size=5)
  # 6 items x 2 orders, all parsed.
  assert result.ratings_asked == 12 and not result.failures
  assert result.items_failed == 0 and len(bodies) == 12
  # Each answer gets (its score + 1) in first position and its score in
  # second: the mean adds 0.5 to both; position_bias measures the +1.
  assert result.position_bias == pytest.approx(1.0)
  counting = result.categories["counting"]
  assert (counting.items, counting.scored) == (3, 3)
  assert counting.mean_reference == pytest.approx(8.5)
  assert counting.mean_ours == pytest.approx((8.5 + 4.5 + 4.5) / 3)
  assert counting.relative == pytest.approx(100 * (17.5 / 3) / 8.5)
  assert result.overall.relative == pytest.approx(counting.relative)
  # The prompt: system instructions, the scene's captions and boxes, the
  # question, both answers, in both orders.
  body = next(b for b in bodies
              if "Question counting 0?" in b["messages"][1]["content"])
  assert body["messages"][0]["role"] == "system"
  user = body["messages"][1]["content"]
  assert "A badger.\nA Tamworth pig.\nbadger: [0.078, 0.156, 0.391, 0.469]" \
      in user
  assert "[Question]\nQuestion counting 0?" in user
  orders = {answers_of(b["messages"][1]["content"])[0].split()[0]
            for b in bodies}
  assert orders == {"GOOD", "BAD"}
  assert "| counting | 3 | 3 | 8.50 |" in result.table()
  assert result.to_dict()["records"][0]["ratings"][0]["reply"].startswith(
      "9 ")


def test_judge_single_orders_and_random_is_seeded(server):
  ref_first = jd.judge_answers(items(), openai_judge(server),
                               order="reference_first")
  # The reference always first: it gets the +1.
  assert ref_first.overall.mean_reference == pytest.approx(9.0)
  assert ref_first.position_bias is None
  ours_first = jd.judge_answers(items(), openai_judge(server),
                                order="ours_first")
  assert ours_first.overall.mean_reference == pytest.approx(8.0)
  a = jd.judge_answers(items(), openai_judge(server), order="random", seed=0)
  b = jd.judge_answers(items(), openai_judge(server), order="random", seed=0)
  flips = [r["ratings"][0]["reference_first"] for r in a.records]
  assert flips == [r["ratings"][0]["reference_first"] for r in b.records]
  assert a.overall == b.overall and len(set(flips)) == 2


def test_judge_http_errors_are_counted(server):
  server.mode = lambda body, attempt: (
      "500" if "Question position" in body["messages"][1]["content"]
      else None)
  judge = openai_judge(server)
  result = jd.judge_answers(items(), judge, order="both")
  assert result.failures == {"judge_error": 6}
  assert result.items_failed == 3
  assert result.categories["position"].scored == 0
  assert result.categories["position"].relative is None
  assert result.categories["counting"].scored == 3
  assert result.judge_counts["failed_http_500"] == 6


class ScriptedJudge(ins.Teacher):
  """Replies from fn(user_prompt, call_index); fn may return None, a
  non-string or raise."""

  def __init__(self, fn):
    super().__init__()
    self.fn, self.calls = fn, 0

  def complete(self, conversations, max_new_tokens, temperature, seed):
    self.calls += 1
    return [self.fn(c[-1]["content"], self.calls) for c in conversations]

  def describe(self):
    return "scripted"


def test_judge_edge_cases_never_crash():
  replies = {
      "counting0": "**Scores:** Assistant 1: 9/10, Assistant 2: 3/10\n",
      "counting1": "I think both are fine.",     # no numbers
      "counting2": "11 3\nGenerous.",             # out of range
      "position0": None,                          # failed request
      "position1": 42,                            # not a string
      "position2": "7-5\nok",                     # 7 and 5, not -5
  }

  def fn(prompt, call):
    item_id = re.search(r"Question (\w+) (\d)", prompt).group
    return replies[item_id(1) + item_id(2)]
  result = jd.judge_answers(items(), ScriptedJudge(fn),
                            order="reference_first")
  assert result.failures == {"malformed": 1, "out_of_range": 1,
                             "judge_error": 2}
  assert result.items_failed == 4
  assert result.categories["counting"].mean_ours == 3.0
  assert result.categories["position"].relative == pytest.approx(100 * 5 / 7)
  assert result.overall.relative == pytest.approx(100 * 4 / 8)
  bad = [r for r in result.records if r["ours"] is None]
  assert {r["ratings"][0]["failure"] for r in bad} == {
      "malformed", "out_of_range", "judge_error"}

  # A judge that raises on its second batch: those ratings are counted and
  # the others still score.
  def flaky(prompt, call):
    if call == 2:
      raise ConnectionError("judge went away")
    return "6 6"
  result = jd.judge_answers(items(), ScriptedJudge(flaky), order="both",
                            batch_size=4)
  assert result.failures == {"judge_exception": 4}
  assert result.first_exception == "ConnectionError: judge went away"
  assert result.overall.scored == 4 and result.overall.relative == 100.0

  # Nothing parses: no score, no crash.
  result = jd.judge_answers(items(1), ScriptedJudge(lambda p, c: "n/a"))
  assert result.overall.relative is None and result.items_failed == 2
  with pytest.raises(ValueError, match="order"):
    jd.judge_answers(items(), ScriptedJudge(fn), order="sideways")
  with pytest.raises(ValueError, match="twice"):
    jd.judge_answers(items()[:1] * 2, ScriptedJudge(fn))


@pytest.mark.parametrize("text,expected", [
    ("8 7", (8.0, 7.0)), ("**8** **7**\nwhy", (8.0, 7.0)),
    ("Assistant 1: 8/10, Assistant 2: 6/10", (8.0, 6.0)),
    ("Scores:\n9 out of 10 and 4 out of 10", (9.0, 4.0)),
    ("7.5, 6", (7.5, 6.0)), ("8-7", (8.0, 7.0)),
    ("Assistant 1 gets 3 points.\nAssistant 2 gets a score of 9.",
     (3.0, 9.0)),
])
def test_parse_scores(text, expected):
  assert jd.parse_scores(text) == jd.Parsed(expected, None)


@pytest.mark.parametrize("text,failure", [
    ("great answers", "malformed"), ("8", "malformed"), ("8 7 6", "malformed"),
    ("", "malformed"), (None, "malformed"), ("0 5", "out_of_range"),
    ("-1 -1", "out_of_range"), ("10 11", "out_of_range"),
])
def test_parse_scores_failures(text, failure):
  assert jd.parse_scores(text).failure == failure

