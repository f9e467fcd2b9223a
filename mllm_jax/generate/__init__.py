"""Text generation: the compiled KV-cache sampler and sampling rules."""
