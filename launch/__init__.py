"""absl binaries, one per job (`python -m launch.<name> --help`)."""
