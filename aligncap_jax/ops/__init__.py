"""Pure jnp ops: RoI-align and attention helpers."""
from aligncap_jax.ops.attention import dot_product_attention
from aligncap_jax.ops.roi_align import roi_align

__all__ = ["dot_product_attention", "roi_align"]
