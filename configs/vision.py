"""Vision tower and projector presets.

`vision_config(name)` and `projector_config(name)` return locked
ml_collections ConfigDicts holding every field, so `--config.vision.<field>`
overrides any of them and a misspelt field is rejected. The ViT-L/14 sizes
are CLIP's (Radford et al. 2021): width 1024, 24 layers, 16 heads, MLP 4096,
at 224 px (16 x 16 patches) or 336 px (24 x 24); LLaVA reads the
penultimate layer's patch tokens, the default here.
"""

import dataclasses

import ml_collections

from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig

_VIT_L14 = dict(patch_size=14, embed_dim=1024, num_layers=24, num_heads=16,
                mlp_dim=4096)
VISION_PRESETS = {
    "clip_vit_l14": dict(image_size=224, **_VIT_L14),
    "clip_vit_l14_336": dict(image_size=336, **_VIT_L14),
    # ViT-S/14-sized, for CPU benchmarks and the demo.
    "small": dict(image_size=224, patch_size=14, embed_dim=384, num_layers=6,
                  num_heads=6, mlp_dim=1536, dtype="float32"),
    # Tiny configs for tests (float32 compute: exact comparisons).
    "tiny": dict(image_size=32, patch_size=8, embed_dim=32, num_layers=3,
                 num_heads=4, mlp_dim=64, dtype="float32"),
    "tiny_64": dict(image_size=64, patch_size=8, embed_dim=64, num_layers=2,
                    num_heads=4, mlp_dim=128, dtype="float32"),
}
PROJECTOR_PRESETS = {
    "linear": dict(projector="linear"),
    "mlp2x_gelu": dict(projector="mlp2x_gelu"),
    # BLIP-2's Q-Former: 32 queries, BERT-base sized, cross-attention in
    # every second layer.
    "qformer": dict(projector="qformer", num_queries=32, num_layers=12,
                    hidden_dim=768, num_heads=12, mlp_dim=3072),
    # mPLUG-Owl's abstractor: 64 queries, 6 layers.
    "abstractor": dict(projector="abstractor", num_queries=64, num_layers=6),
    "tiny_qformer": dict(projector="qformer", num_queries=8, num_layers=2,
                         hidden_dim=32, num_heads=4, mlp_dim=64),
    "tiny_abstractor": dict(projector="abstractor", num_queries=8,
                            num_layers=2, num_heads=4, mlp_dim=64),
}


def _locked(cls, presets, name: str, overrides) -> ml_collections.ConfigDict:
  if name not in presets:
    raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: "
                     f"{sorted(presets)}")
  config = ml_collections.ConfigDict(dataclasses.asdict(
      cls(**{**presets[name], **overrides})))
  config.lock()  # a misspelt field is an error, not a new field
  return config


def vision_config(name: str, **overrides) -> ml_collections.ConfigDict:
  return _locked(VisionConfig, VISION_PRESETS, name, overrides)


def projector_config(name: str, **overrides) -> ml_collections.ConfigDict:
  return _locked(ProjectorConfig, PROJECTOR_PRESETS, name, overrides)


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  """`--config=configs/vision.py:clip_vit_l14` prints or checks a preset."""
  return ml_collections.ConfigDict({"vision": vision_config(name)})
