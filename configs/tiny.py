"""Tiny AlignCap for CPU tests: every block a few units wide, a few steps.

Reproduces nothing; it exercises the whole pipeline (data, train, checkpoint,
eval, predict) in seconds on 2 CPU cores:

  python -m aligncap_jax.main --config configs/tiny.py --workdir /tmp/tiny --mode train

Everything is trained from scratch except the CLIP text tower, whose tag
embeddings the trainer caches (training it would make them stale).
"""
from __future__ import annotations

from aligncap_jax import config as base


def get_config(arg=None):
  del arg
  c = base.base_config()
  d, m = c.data, c.model
  d.view_size = 32
  d.max_caption_tokens = 16
  d.max_prompt_tokens = 16
  d.tag_vocab_size = 32
  d.synthetic.num_train_images = 24
  d.synthetic.num_validation_images = 8
  d.synthetic.num_test_images = 8
  d.synthetic.image_size = 64

  m.vision.update(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                  mlp_dim=64)
  m.qformer.update(num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=2,
                   intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=32,
                   max_position_embeddings=32, vocab_size=128)
  m.llm.update(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1,
               num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16)
  m.clip_text.update(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, eos_token_id=1, projection_dim=32)
  m.roi_output_size = 4
  m.cross_view.num_heads = 2
  m.tagging.update(dim=16, num_heads=2, mlp_dim=32, num_layers=1)
  m.scorer.update(dim=16, num_heads=2, mlp_dim=32, num_layers=1)
  m.pairwise_form = "chunked"
  m.pairwise_block_size = 4
  m.frozen_dtype = "float32"
  m.remat = False

  c.trainable = [r"^(?!clip_text/)"]
  m.train_query_tokens = True
  c.optim.warmup_steps = 1
  c.optim.learning_rate = 1e-3
  c.train.update(per_device_batch_size=2, total_steps=4, log_every_steps=1,
                 checkpoint_every_steps=2, eval_batch_size=4, eval_max_examples=8)
  c.decode.max_new_tokens = 8
  return c
