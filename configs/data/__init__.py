"""Data pipeline recipes (ml_collections configs)."""
