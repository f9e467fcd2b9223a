"""Console hygiene shared by the binaries."""

from absl import flags, logging


def quiet_library_logs() -> None:
  """Shows warnings and errors only, unless the user passed --verbosity/-v.

  Orbax and JAX log every checkpoint step at INFO through absl; the binaries
  print their own progress lines, so library INFO is opt-in (`-v 0`).
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
