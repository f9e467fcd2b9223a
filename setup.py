"""mllm_jax: a JAX-native multimodal LLM research codebase."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name: str) -> list[str]:
  """Reads requirements/NAME.txt: one version range per line, '#' comments."""
  with open(os.path.join(HERE, "requirements", f"{name}.txt")) as f:
    lines = (line.split("#")[0].strip() for line in f)
    return [line for line in lines if line]


setup(
    name="mllm_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["mllm_jax*", "data_pipeline*", "launch*",
                                    "configs*"]),
    package_data={"data_pipeline": ["assets/*.txt"]},
    install_requires=requirements("core"),
    extras_require={
        name: requirements(name)
        for name in ("test", "tpu", "gpu", "data", "beam")
    },
)
