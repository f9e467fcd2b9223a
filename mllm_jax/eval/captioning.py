"""Captioning metrics: BLEU-1..4, ROUGE-L and CIDEr-D, as coco-caption
computes them.

    from mllm_jax.eval import captioning
    scores = captioning.caption_metrics(
        {"img1": ["A dog runs on the grass.", "a brown dog running"], ...},
        {"img1": "a dog running on grass", ...})
    scores.summary()  # {"BLEU-1": ..., "BLEU-4": ..., "ROUGE-L": ...,
                      #  "CIDEr-D": ..., "images": 2}

Inputs are `{image_id: [reference captions]}` and `{image_id: candidate}`
with the same ids (a missing or extra id, an image without references, or
a reference that is empty after tokenisation is a ValueError naming the
image). Scores are on coco-caption's scale (BLEU and ROUGE-L in [0, 1],
CIDEr-D with its factor 10); papers usually print them times 100.

Tokenisation (`tokenize`, the same for references and candidates): Unicode
NFKC, curly quotes made straight, dashes to "--", lower case, then a
Penn-Treebank-style split (contractions apart: "dog's" -> "dog 's",
"can't" -> "ca n't", "cannot" -> "can not"; hyphenated words, numbers
such as 3.5, 1,000 or .25, acronyms such as u.s. and titles such as mr.
kept whole; every other symbol its own token), then the punctuation
coco-caption drops after its tokeniser is removed (. , ? ! : ; - -- ... '
and quotes). Two quirks of coco-caption are kept so that numbers compare
with published ones: brackets become the words -lrb- / -rrb- (Stanford
writes -LRB-, lower-cased by -lowerCase, which coco's upper-case list
never removes), and runs such as "!!!" or "?!" stay tokens. coco-caption
runs Stanford CoreNLP 3.4.1's PTBTokenizer in Java for this; ours is a
pure-Python regex that gives the same tokens on every real caption tried
(docs/evaluation.md: 805 Tux Paint captions and 34 hand-written tricky
ones; the known differences are listed there). `caption_metrics(...,
tokenizer=str.split)` scores text that is already tokenised.

The metrics (formulas in words in docs/evaluation.md):
  * BLEU-n (`bleu`): corpus level: clipped n-gram matches and candidate
    n-grams summed over all images, the geometric mean of the 1..n
    precisions, times the brevity penalty exp(1 - r/c) when the summed
    candidate length c is below the summed effective reference length r
    (per image, the reference length closest to the candidate's, the
    shorter on a tie). coco-caption's smoothing constants are kept
    (1e-15 added to matches, 1e-9 to counts), so an order with no match
    gives a tiny number, not 0, exactly as coco reports.
  * ROUGE-L (`rouge_l`): per image, the longest common subsequence with
    each reference gives precision LCS/|candidate| and recall
    LCS/|reference|; the best precision and the best recall over the
    references (each maximised separately) give
    F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; the mean over images.
  * CIDEr-D (`cider_d`): per image, TF-IDF vectors of the 1..4-grams (raw
    counts times log(N / max(1, df)), N the number of images and df the
    number of images whose references contain the n-gram, so the document
    frequencies come from the reference set being scored); for each
    reference and each n the candidate's clipped vector
    (min(candidate, reference) weight) dotted with the reference's over
    both norms, times the length penalty exp(-d^2 / (2 * 6^2)); averaged
    over n and references, times 10; the mean over images. As in
    coco-caption the length d is the difference of the *bigram* counts
    (its `length` counts 2-grams), which equals the word-count difference
    whenever both captions have a word.

Why our own code: the reference implementation, pycocoevalcap (the
coco-caption code on PyPI), is a 104 MB wheel (it bundles the Java
tokeniser, METEOR and SPICE jars), needs Java for the tokenisation that
every score depends on, pulls pycocotools, asserts instead of raising on
bad input, and prints; HF `evaluate` and torchmetrics have BLEU and ROUGE,
sacrebleu BLEU, none of them CIDEr-D, and their BLEU is not
coco-caption's (sentence-level, or sacrebleu's tokenisation and
smoothing); the CIDEr-D code other projects use is coco-caption's, copied
into their trees. The scorers are ~150 lines of plain
Python; tests/test_mm_eval_metrics.py checks them against pycocoevalcap's
own Bleu / Rouge / Cider classes (a test-only dependency) on the same
token strings, to 1e-9. ROUGE-L is coco's (b = 1.2, best P and best R taken
separately), not the `rouge-score` package's (F1 of the best-scoring
reference, its own tokenisation), because captioning papers report coco's;
`rouge_l(..., beta=1.0)` with one reference equals rouge-score's F1 on the
same tokens (tested), and the two differ on multi-reference sets by the
amounts in docs/evaluation.md.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import unicodedata
from typing import Callable, Hashable, Mapping, Sequence

Tokens = Sequence[str]

# What coco-caption removes after Stanford's PTBTokenizer (its PUNCTUATIONS
# list, lower case), plus the double quote, which that tokeniser rewrites
# into `` or '' (in the list).
DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-",
                     "--", "...", ";", '"'])

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'",
                         "\u201b": "'", "\u2032": "'", "\u201c": '"',
                         "\u201d": '"', "\u201e": '"', "\u2033": '"',
                         "\u00ab": '"', "\u00bb": '"', "\u2013": " -- ",
                         "\u2014": " -- ", "\u20ac": "$"})
# Stanford's tokeniser writes brackets as -LRB- etc., and with -lowerCase
# these are lower case, which coco's (upper-case) punctuation list misses:
# coco-caption keeps them as words. So do we.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
             "{": "-lcb-", "}": "-rcb-"}
_NT = re.compile(r"(?<=\w)(n't)\b")
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b")
_CLITIC = re.compile(r"(?<=\w)('(?:s|re|ve|ll|d|m))\b")
_TOKEN = re.compile(
    r"(?:[^\W\d_]\.){2,}"          # acronyms: u.s., a.m.
    r"|\b(?:mr|mrs|ms|dr|st|jr|sr|prof|mt|vs)\.(?=\s+\w)"  # titles
    r"|\d+(?:[.,:]\d+)+|\.\d+"     # 3.5  1,000  10:30  .25
    r"|n't|'(?:s|re|ve|ll|d|m)\b"  # split-off contractions
    r"|\w+(?:[-&'/]\w+)*"          # words, t-shirt, at&t, o'clock
    r"|\.\.\.|--|[!?]{2,}"         # ellipsis, dash, "!!!" (kept)
    r"|[^\w\s]")                   # any other symbol alone


def tokenize(text: str) -> list[str]:
  """Lower-cased PTB-style tokens without punctuation (module docstring)."""
  text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
  text = _CLITIC.sub(r" \1", _NT.sub(r" \1", text))
  text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g),
                          text)
  tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
  return [t for t in tokens if t not in DROPPED]


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def _check_ids(references: Mapping, candidates: Mapping) -> list[Hashable]:
  missing = [k for k in references if k not in candidates]
  extra = [k for k in candidates if k not in references]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} image(s) without a candidate "
                   f"(e.g. {missing[:3]!r})")
    if extra:
      parts.append(f"{len(extra)} candidate(s) without references "
                   f"(e.g. {extra[:3]!r})")
    raise ValueError("references and candidates must cover the same "
                     "images: " + "; ".join(parts))
  if not references:
    raise ValueError("no images to score")
  for k, refs in references.items():
    if isinstance(refs, str) or not len(refs):
      raise ValueError(f"image {k!r}: references must be a non-empty list "
                       f"of captions, got {refs!r}")
  return list(references)


def _check_tokens(references: Mapping[Hashable, Sequence[Tokens]],
                  candidates: Mapping[Hashable, Tokens]) -> list[Hashable]:
  ids = _check_ids(references, candidates)
  for k in ids:
    if isinstance(candidates[k], str):
      raise ValueError(f"image {k!r}: the candidate must be a token list "
                       f"here (caption_metrics tokenises strings)")
    for r in references[k]:
      if isinstance(r, str):
        raise ValueError(f"image {k!r}: references must be token lists here "
                         f"(caption_metrics tokenises strings)")
      if not len(r):
        raise ValueError(f"image {k!r}: a reference caption has no token")
  return ids


def _ngrams(tokens: Tokens, n: int) -> collections.Counter:
  counts: collections.Counter = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


# ----------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------

_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's smoothing


def bleu(references: Mapping[Hashable, Sequence[Tokens]],
         candidates: Mapping[Hashable, Tokens], n: int = 4
         ) -> tuple[list[float], dict[Hashable, list[float]]]:
  """Corpus BLEU-1..n and each image's own BLEU-1..n (module docstring).

  references: {image_id: [token list, ...]}; candidates: {image_id: token
  list}. Returns ([BLEU-1, ..., BLEU-n], {image_id: [BLEU-1, ..., BLEU-n]}).
  """
  ids = _check_tokens(references, candidates)
  total_c = total_r = 0
  total_guess, total_correct = [0] * n, [0] * n
  per_image = {}
  for k in ids:
    cand = list(candidates[k])
    c = len(cand)
    max_ref: dict[tuple, int] = {}
    lengths = []
    for ref in references[k]:
      lengths.append(len(ref))
      for g, cnt in _ngrams(list(ref), n).items():
        if cnt > max_ref.get(g, 0):
          max_ref[g] = cnt
    r = min((abs(length - c), length) for length in lengths)[1]
    guess = [max(0, c - i) for i in range(n)]
    correct = [0] * n
    for g, cnt in _ngrams(cand, n).items():
      correct[len(g) - 1] += min(max_ref.get(g, 0), cnt)
    total_c += c
    total_r += r
    for i in range(n):
      total_guess[i] += guess[i]
      total_correct[i] += correct[i]
    per_image[k] = _bleu_from_counts(correct, guess, c, r)
  return _bleu_from_counts(total_correct, total_guess, total_c,
                           total_r), per_image


def _bleu_from_counts(correct, guess, c, r) -> list[float]:
  out, product = [], 1.0
  for i in range(len(correct)):
    product *= (correct[i] + _TINY) / (guess[i] + _SMALL)
    out.append(product ** (1.0 / (i + 1)))
  ratio = (c + _TINY) / (r + _SMALL)
  if ratio < 1:
    out = [b * math.exp(1 - 1 / ratio) for b in out]
  return out


# ----------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------


def lcs_length(a: Tokens, b: Tokens) -> int:
  """Length of the longest common subsequence of two token lists."""
  if len(a) < len(b):
    a, b = b, a
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(references: Mapping[Hashable, Sequence[Tokens]],
            candidates: Mapping[Hashable, Tokens], beta: float = 1.2
            ) -> tuple[float, dict[Hashable, float]]:
  """Mean ROUGE-L over images and each image's score (module docstring).

  beta=1.2 is coco-caption's; with beta=1.0 and one reference this is the
  LCS F1 that the rouge-score package computes.
  """
  ids = _check_tokens(references, candidates)
  per_image = {}
  for k in ids:
    cand = list(candidates[k])
    best_p = best_r = 0.0
    for ref in references[k]:
      lcs = lcs_length(list(ref), cand)
      if cand:
        best_p = max(best_p, lcs / len(cand))
      best_r = max(best_r, lcs / len(ref))
    if best_p and best_r:
      b2 = beta * beta
      per_image[k] = (1 + b2) * best_p * best_r / (best_r + b2 * best_p)
    else:
      per_image[k] = 0.0
  return sum(per_image.values()) / len(ids), per_image


# ----------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------


def cider_d(references: Mapping[Hashable, Sequence[Tokens]],
            candidates: Mapping[Hashable, Tokens], n: int = 4,
            sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
  """Mean CIDEr-D over images and each image's score (module docstring).

  The document frequencies come from these references, so a score depends
  on the whole set it is computed over (as in coco-caption): the CIDEr-D
  of one image alone is 0 (log(1 / 1) weights).
  """
  ids = _check_tokens(references, candidates)
  ref_counts = {k: [_ngrams(list(r), n) for r in references[k]] for k in ids}
  df: collections.Counter = collections.Counter()
  for k in ids:
    df.update(set().union(*ref_counts[k]))
  log_n = math.log(float(len(ids)))

  def vector(counts):
    vec = [{} for _ in range(n)]
    norm = [0.0] * n
    bigrams = 0
    for g, tf in counts.items():
      i = len(g) - 1
      w = float(tf) * (log_n - math.log(max(1.0, float(df[g]))))
      vec[i][g] = w
      norm[i] += w * w
      if i == 1:  # coco-caption's `length` counts bigrams
        bigrams += tf
    return vec, [math.sqrt(x) for x in norm], bigrams

  per_image = {}
  for k in ids:
    vec, norm, length = vector(_ngrams(list(candidates[k]), n))
    total = [0.0] * n
    for counts in ref_counts[k]:
      rvec, rnorm, rlength = vector(counts)
      penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma ** 2))
      for i in range(n):
        dot = 0.0
        for g, w in vec[i].items():
          rw = rvec[i].get(g, 0.0)
          dot += min(w, rw) * rw
        if norm[i] != 0 and rnorm[i] != 0:
          dot /= norm[i] * rnorm[i]
        total[i] += dot * penalty
    per_image[k] = sum(total) / n / len(ref_counts[k]) * 10.0
  return sum(per_image.values()) / len(ids), per_image


# ----------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaptionScores:
  """Corpus scores and, per image, {"BLEU-1".."BLEU-4", "ROUGE-L",
  "CIDEr-D"}."""
  bleu: tuple[float, ...]
  rouge_l: float
  cider_d: float
  images: int
  per_image: dict

  def summary(self) -> dict[str, float]:
    out = {f"BLEU-{i + 1}": b for i, b in enumerate(self.bleu)}
    out.update({"ROUGE-L": self.rouge_l, "CIDEr-D": self.cider_d,
                "images": self.images})
    return out


def caption_metrics(references: Mapping[Hashable, Sequence[str]],
                    candidates: Mapping[Hashable, str],
                    tokenizer: Callable[[str], list[str]] = tokenize
                    ) -> CaptionScores:
  """BLEU-1..4, ROUGE-L and CIDEr-D of candidate captions (strings) against
  reference captions (strings), tokenised by `tokenizer`."""
  ids = _check_ids(references, candidates)
  refs, cands = {}, {}
  for k in ids:
    if not isinstance(candidates[k], str):
      raise ValueError(f"image {k!r}: the candidate must be a string, got "
                       f"{type(candidates[k]).__name__}")
    cands[k] = tokenizer(candidates[k])
    refs[k] = []
    for r in references[k]:
      if not isinstance(r, str):
        raise ValueError(f"image {k!r}: a reference must be a string, got "
                         f"{type(r).__name__}")
      tokens = tokenizer(r)
      if not tokens:
        raise ValueError(f"image {k!r}: the reference {r!r} has no token "
                         f"after tokenisation")
      refs[k].append(tokens)
  b, b_img = bleu(refs, cands)
  r, r_img = rouge_l(refs, cands)
  c, c_img = cider_d(refs, cands)
  per_image = {}
  for k in ids:
    row = {f"BLEU-{i + 1}": v for i, v in enumerate(b_img[k])}
    row.update({"ROUGE-L": r_img[k], "CIDEr-D": c_img[k]})
    per_image[k] = row
  return CaptionScores(tuple(b), r, c, len(ids), per_image)
