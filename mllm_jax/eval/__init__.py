"""Evaluation: perplexity, prompt templates, multiple-choice and generative
benchmarks, and the code sandbox."""
