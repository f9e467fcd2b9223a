"""The metric writer starts without importing torch (tensorboardX would,
for 4 s a binary) and still writes TensorBoard events."""

import subprocess
import sys

from tests.test_pretrain import REPO

SCRIPT = """
import sys
from mllm_jax.train.metrics import MetricWriter
writer = MetricWriter(sys.argv[1])
print("torch" in sys.modules)
import torch  # still importable afterwards
print(torch.__name__)
"""


def test_writer_imports_tensorboardx_without_torch(tmp_path):
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "torch"], out.stderr[-2000:]
  assert list((tmp_path / "tensorboard").iterdir())
