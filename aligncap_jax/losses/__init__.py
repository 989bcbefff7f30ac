"""Losses: pairwise sigmoid (dense / chunked / ring), asymmetric loss, caption xent."""
from aligncap_jax.losses.asl import asymmetric_loss
from aligncap_jax.losses.caption import caption_cross_entropy
from aligncap_jax.losses.pairwise_sigmoid import dot_score
from aligncap_jax.losses.pairwise_sigmoid import pairwise_sigmoid_loss
from aligncap_jax.losses.pairwise_sigmoid import reference_allgather_pairwise_sigmoid_loss
from aligncap_jax.losses.pairwise_sigmoid import sharded_pairwise_sigmoid_loss

__all__ = [
    "asymmetric_loss",
    "caption_cross_entropy",
    "dot_score",
    "pairwise_sigmoid_loss",
    "reference_allgather_pairwise_sigmoid_loss",
    "sharded_pairwise_sigmoid_loss",
]
