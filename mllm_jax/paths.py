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
