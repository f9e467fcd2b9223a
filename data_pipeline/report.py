"""The funnel report: ``stats.json``, ``report.md`` and ``funnel.png``.

Like RefinedWeb's Figure 2: documents and bytes kept after each stage, the
share each stage removed, and its top drop reasons; ``stats.json`` also keeps
a few dropped documents per reason for inspection.
"""

from __future__ import annotations

import json
import os

from data_pipeline.document import Funnel
from data_pipeline.warc import STAGE


def write_stats(funnel: Funnel, out_dir: str) -> str:
  funnel.check()
  path = os.path.join(out_dir, "stats.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(funnel.to_json(), f, indent=1, sort_keys=True, ensure_ascii=False)
  return path


def _pct(part: int, whole: int) -> str:
  return f"{100.0 * part / whole:.1f}%" if whole else "-"


def write_markdown(funnel: Funnel, out_dir: str, title: str = "Corpus funnel") -> str:
  lines = [f"# {title}", "",
           "| stage | docs in | docs out | removed | bytes in | bytes out | top drop reasons |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
  for s in funnel.stages.values():
    reasons = ", ".join(f"{r} {n}" for r, n in s.dropped.most_common(3))
    lines.append(f"| {s.name} | {s.docs_in} | {s.docs_out} | "
                 f"{_pct(s.docs_in - s.docs_out, s.docs_in)} | {s.bytes_in} | "
                 f"{s.bytes_out} | {reasons} |")
  lines += _lost_records(funnel) + _fallbacks(funnel)
  lines += ["", "Dropped samples per reason are in `stats.json` "
            "(`dropped_samples`).", ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return path


def _lost_records(funnel: Funnel) -> list[str]:
  """Records the reader could not use, per reason (``skip:*`` are records
  of other types, not losses), and where the skipped spans were."""
  read = funnel.stages.get(STAGE)
  if read is None:
    return []
  lost = [(r, n) for r, n in sorted(read.dropped.items())
          if not r.startswith("skip:")]
  if not lost:
    return ["", "Records lost in reading: none."]
  lines = ["", "## Records lost in reading", "",
           "| reason | records | bytes |", "| --- | ---: | ---: |"]
  lines += [f"| {r} | {n} | {read.dropped_bytes[r]} |" for r, n in lost]
  if funnel.lost_spans:
    lines += ["", "Skipped spans (file, byte offset, length, reason; the "
              f"first {len(funnel.lost_spans)} are in `stats.json`):", ""]
    lines += [f"- {s['file']} @ {s['offset']} +{s['length']}: {s['reason']}"
              for s in funnel.lost_spans[:20]]
  return lines


def _fallbacks(funnel: Funnel) -> list[str]:
  rows = [(s.name, r, n) for s in funnel.stages.values()
          for r, n in sorted(s.fallbacks.items())]
  if not rows:
    return []
  return (["", "## Kept through a fallback", "",
           "| stage | reason | documents |", "| --- | --- | ---: |"]
          + [f"| {name} | {r} | {n} |" for name, r, n in rows])


def write_plot(funnel: Funnel, out_dir: str) -> str:
  """Bars of documents (and bytes) remaining after each stage, as a share of
  the first stage's output."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  stages = list(funnel.stages.values())
  base_docs = max(1, stages[0].docs_out) if stages else 1
  base_bytes = max(1, stages[0].bytes_out) if stages else 1
  names = [s.name for s in stages]
  docs = [100.0 * s.docs_out / base_docs for s in stages]
  nbytes = [100.0 * s.bytes_out / base_bytes for s in stages]
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
  x = range(len(names))
  ax.bar([i - 0.2 for i in x], docs, 0.4, label="documents")
  ax.bar([i + 0.2 for i in x], nbytes, 0.4, label="bytes")
  for i, s in enumerate(stages):
    removed = _pct(s.docs_in - s.docs_out, s.docs_in)
    ax.annotate(f"-{removed}", (i, max(docs[i], nbytes[i]) + 2), ha="center",
                fontsize=8)
  ax.set_xticks(list(x), names, rotation=30, ha="right")
  ax.set_ylabel(f"% of {names[0] if names else ''} output kept")
  ax.set_title("Data funnel")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, "funnel.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(funnel: Funnel, out_dir: str) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  return {"stats": write_stats(funnel, out_dir),
          "markdown": write_markdown(funnel, out_dir),
          "plot": write_plot(funnel, out_dir)}
