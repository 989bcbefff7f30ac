"""Pure jnp ops: RoI-align and attention helpers."""
from aligncap_jax.ops.attention import dot_product_attention
from aligncap_jax.ops.roi_align import box_coverage, box_geometry, roi_align

__all__ = ["box_coverage", "box_geometry", "dot_product_attention", "roi_align"]
