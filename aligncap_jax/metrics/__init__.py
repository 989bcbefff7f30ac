"""Evaluation metrics that need no model: DenseCap mAP (`densecap_map`)."""
from aligncap_jax.metrics.densecap import IOU_THRESHOLDS
from aligncap_jax.metrics.densecap import LUA_METEOR_THRESHOLDS
from aligncap_jax.metrics.densecap import METEOR_THRESHOLDS
from aligncap_jax.metrics.densecap import MeteorScorer
from aligncap_jax.metrics.densecap import average_precision
from aligncap_jax.metrics.densecap import densecap_map
from aligncap_jax.metrics.densecap import merge_groups
from aligncap_jax.metrics.densecap import pairwise_iou

__all__ = ["IOU_THRESHOLDS", "LUA_METEOR_THRESHOLDS", "METEOR_THRESHOLDS", "MeteorScorer",
           "average_precision", "densecap_map", "merge_groups", "pairwise_iou"]
