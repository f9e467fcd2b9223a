"""HF PEFT adapters through `python -m launch.convert_checkpoint`: a LoRA made
by the `peft` library on a random tiny LLaMA goes --from=peft (against its
base) and back --from=adapter, and peft loads the result with the same
tensors and logits; bad adapters and misused flags are refused naming the
file or flag, without a traceback.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from mllm_jax.convert import peft as peft_io  # noqa: E402
from tests.helpers import random_hf_llama  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
HF_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5)
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)


def run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "launch.convert_checkpoint",
                         *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False,
                        timeout=300)


def logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
  """(HF base dir, PEFT adapter dir, the peft model that wrote it)."""
  root = tmp_path_factory.mktemp("peft")
  random_hf_llama(0, **HF_BASE).save_pretrained(root / "hf")
  model = peft.get_peft_model(random_hf_llama(0, **HF_BASE),
                              peft.LoraConfig(**LORA))
  torch.manual_seed(1)
  with torch.no_grad():  # B off zero, so that every factor reaches logits
    for key, p in model.named_parameters():
      if "lora_" in key:
        p.copy_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(root / "adapter")
  return root / "hf", root / "adapter", model


def test_round_trip_through_the_cli(adapter, tmp_path):
  hf_dir, peft_dir, reference = adapter
  result = run("--from=peft", f"--input={peft_dir}", f"--base={hf_dir}",
               f"--output={tmp_path / 'native'}")
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(tmp_path / "native")) == [
      peft_io.ADAPTER_PARAMS, peft_io.ADAPTER_CONFIG]
  _, lora = peft_io.read_adapter_config(str(tmp_path / "native"))
  assert (lora.method, lora.rank, lora.alpha, lora.rslora) == (
      "lora", 4, 8.0, True)
  assert lora.targets == ("q", "k", "v", "o", "gate", "up", "down")

  result = run("--from=adapter", f"--input={tmp_path / 'native'}",
               f"--output={tmp_path / 'back'}",
               f"--base_model_name_or_path={hf_dir}")
  assert result.returncode == 0, result.stderr
  config = json.loads((tmp_path / "back" / peft_io.PEFT_CONFIG).read_text())
  assert config["base_model_name_or_path"] == str(hf_dir)
  assert (config["peft_type"], config["r"], config["lora_alpha"],
          config["use_rslora"]) == ("LORA", 4, 8, True)
  again = run("--from=adapter", f"--input={tmp_path / 'native'}",
              f"--output={tmp_path / 'back'}")
  assert again.returncode != 0 and "--overwrite" in again.stderr, again.stderr

  original = load_file(peft_dir / peft_io.PEFT_WEIGHTS)
  exported = load_file(tmp_path / "back" / peft_io.PEFT_WEIGHTS)
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  back = peft.PeftModel.from_pretrained(random_hf_llama(0, **HF_BASE),
                                        str(tmp_path / "back")).eval()
  tokens = np.random.RandomState(0).randint(0, HF_BASE["vocab_size"], (2, 12))
  theirs, ours = logits(reference, tokens), logits(back, tokens)
  diff = float(np.abs(ours - theirs).max())
  print(f"round trip: max |peft(exported) - peft(original)| = {diff:.3g}")
  assert diff <= TOLERANCE
  with back.disable_adapter():  # the adapter acts
    assert np.abs(logits(back, tokens) - theirs).max() > 1e-2


def copy_adapter(peft_dir, path, **changes):
  shutil.copytree(peft_dir, path)
  config = json.loads((path / peft_io.PEFT_CONFIG).read_text())
  (path / peft_io.PEFT_CONFIG).write_text(json.dumps({**config, **changes}))
  return path


@pytest.mark.parametrize("kind", ["dora", "other_base", "prompt_tuning",
                                  "no_weights"])
def test_bad_adapters_are_refused_naming_file_and_problem(kind, adapter,
                                                          tmp_path):
  hf_dir, peft_dir, _ = adapter
  path, base = tmp_path / "adapter", hf_dir
  if kind == "dora":
    copy_adapter(peft_dir, path, use_dora=True)
    file, words = path / peft_io.PEFT_CONFIG, "use_dora"
  elif kind == "prompt_tuning":
    copy_adapter(peft_dir, path, peft_type="PROMPT_TUNING")
    file, words = path / peft_io.PEFT_CONFIG, "only LoRA"
  elif kind == "no_weights":
    copy_adapter(peft_dir, path)
    os.remove(path / peft_io.PEFT_WEIGHTS)
    file, words = path, peft_io.PEFT_WEIGHTS
  else:  # the base the adapter is given has a wider MLP than its own
    path, base = peft_dir, tmp_path / "wide"
    random_hf_llama(0, **{**HF_BASE, "intermediate_size": 128}
                    ).save_pretrained(base)
    file, words = peft_dir / peft_io.PEFT_WEIGHTS, "has shape"
  result = run("--from=peft", f"--input={path}", f"--base={base}",
               f"--output={tmp_path / 'out'}")
  assert result.returncode != 0
  assert "convert_checkpoint: error:" in result.stderr, result.stderr
  assert str(file) in result.stderr and words in result.stderr, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert not os.path.exists(tmp_path / "out"), "nothing is written"


@pytest.mark.parametrize("args, flag", [
    (["--from=peft"], "--base"),
    (["--from=adapter", "--base=BASE"], "--base"),
    (["--from=hf", "--base_model_name_or_path=NAME"],
     "--base_model_name_or_path"),
    (["--from=adapter", "--dtype=float32"], "--dtype"),
    (["--from=peft", "--base={native}", "--weight_dtype=bfloat16"],
     "--weight_dtype"),
], ids=["peft_without_base", "adapter_with_base", "hf_with_name",
        "adapter_with_dtype", "native_base_with_weight_dtype"])
def test_flag_misuse_is_a_usage_error_naming_the_flag(args, flag, tmp_path):
  os.makedirs(tmp_path / "native")  # a native base fixes its dtypes
  (tmp_path / "native" / "model_config.json").write_text("{}")
  args = [a.format(native=tmp_path / "native") for a in args]
  result = run(*args, f"--input={tmp_path / 'in'}",
               f"--output={tmp_path / 'out'}")
  assert result.returncode != 0
  assert f"{flag} " in result.stderr, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert not os.path.exists(tmp_path / "out")
