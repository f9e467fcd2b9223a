"""Tokenizers, token shards and the Grain pretraining pipeline (docs/data.md)."""
