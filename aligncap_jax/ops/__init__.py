"""Pure jnp ops: RoI-align, attention helpers and the exact GELU."""
from aligncap_jax.ops.activations import gelu_exact
from aligncap_jax.ops.attention import dot_product_attention
from aligncap_jax.ops.roi_align import box_coverage, box_geometry, roi_align

__all__ = ["box_coverage", "box_geometry", "dot_product_attention", "gelu_exact", "roi_align"]
