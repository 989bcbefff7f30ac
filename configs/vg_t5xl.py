"""AlignCap on Visual Genome v1.2 region captioning, BLIP-2 ViT-g + Flan-T5-XL.

Reproduces the paper's reference recipe (DESIGN.md sections 3-4): frozen EVA ViT-g/14
and Flan-T5-XL from BLIP-2 (`blip2-flan-t5-xl`), frozen CLIP ViT-L/14 text tower
for tags and captions, trainable cross-view block, view fusion, Q-Former (query
tokens frozen), language projection, tagging head, scorers and prompt vector;
AdamW lr 1e-4, weight decay 0.05, cosine, 64 regions per device x 8 devices
(here 32 per device by default, see Memory below),
5 epochs, tags over sigmoid 0.8 at inference. Architecture fields equal the
public checkpoints' config.json; the importer checks them against the folders.

Run (weights are local Hugging Face folders):
  python -m aligncap_jax.main --config configs/vg_t5xl.py --workdir workdirs/vg_t5xl \
      --mode prepare --config.data.manual_dir=/data/vg
  python -m aligncap_jax.main --config configs/vg_t5xl.py --workdir workdirs/vg_t5xl \
      --mode train --config.init.blip2=/models/blip2-flan-t5-xl \
      --config.init.clip_text=/models/clip-vit-large-patch14
Check before renting hardware:
  XLA_FLAGS="--xla_force_host_platform_device_count=8 \
      --xla_cpu_enable_concurrency_optimized_scheduler=false" \
  python -m aligncap_jax.main --config configs/vg_t5xl.py --mode aot --aot_topology cpu:8
  python -m aligncap_jax.main --config configs/vg_t5xl.py:v5e_8 --mode aot --aot_topology v5e:2x4
  python -m aligncap_jax.main --config configs/vg_t5xl.py --mode describe

Variants (`configs/vg_t5xl.py:ARG`):
  (none)   8 devices, fsdp over all of them, 32 regions per device (global 256).
  v5e_8    a TPU v5e-8 (v5litepod-8): same mesh and batch.
  v5e_256  a v5e-256 pod slice: 64 regions per chip, global batch 16384, fsdp=16
           inside data=16, ring pairwise loss (the N x N logits never on one chip);
           11.94 GiB per chip from the TPU compiler (see Memory). Check, then launch:
             python -m aligncap_jax.main --config configs/vg_t5xl.py:v5e_256 \
                 --mode aot --aot_topology v5e:16x16 --workdir /tmp/aot
             bash launch/tpu_vm.sh --name NAME --zone ZONE --create \
                 --accelerator v5litepod-256 --workdir gs://BUCKET/runs/vg \
                 --config configs/vg_t5xl.py:v5e_256
  smoke    tiny sizes, synthetic data, 4 steps on CPU (what CI runs).

Memory (`--mode aot`, per device: argument + output - alias + temporary; "fits" is
<= 16 GiB on fake CPU devices, an f32 upper bound, and <= 15 GiB from the TPU
compiler). Measured on a 2-core CPU machine, jax/libtpu 0.10.2, train step:

  target       regions/device  argument   temporary  peak       compile s
  cpu:8        64              1.58 GiB   23.44 GiB  25.02 GiB  33
  cpu:8        32              1.57 GiB   12.48 GiB  14.05 GiB  51
  v5e:2x4      64              1.65 GiB   13.70 GiB  15.36 GiB  760
  v5e:2x4      32              1.64 GiB    7.30 GiB   8.94 GiB  392 (520 before issue 19)
  v5e:16x16    64              1.08 GiB   10.86 GiB  11.94 GiB  535

The decode step (64 regions per device, beam 2) peaks at 9.92 GiB on cpu:8,
13.03 GiB on v5e:2x4 (so `per-device peak` is 13.03 GiB there) and 10.45 GiB on
v5e:16x16 (compile 158 s). At 256 chips, 64 regions per chip fit where they do not on
8: fsdp=16 halves the state per chip and the ring keeps the pairwise losses' memory
per chip independent of the global batch. The trade on 8 chips: the
reference's 64 regions per device does not fit a 16 GiB chip with this model
(the tagging head's [regions, 4585 tags, 1024] FFN activations dominate the
temporaries; rematerialising its layers saves only
1.1 GiB on cpu:8, and bf16 activations for the trainable blocks 2.3 GiB), so the
default runs 32 regions per device: half the reference global batch (256 instead
of 512), so also half the N of the pairwise losses per step. Reach the
reference's 512 with 16 devices, or with 64 per device on chips with more HBM
(`--config.train.per_device_batch_size=64`). The levers already set: fsdp over
every chip (the bf16 frozen towers split 8 or 16 ways), scan over layers with remat.
"""
from aligncap_jax import config as base


def reference(name: str, tag_threshold: float):
  """The reference recipe shared by vg_t5xl and refcocog_t5xl (base defaults = BLIP-2 sizes)."""
  c = base.base_config()
  c.data.name = name
  c.data.view_size = 224
  c.data.num_views = 3
  c.data.max_caption_tokens = 32
  c.data.max_prompt_tokens = 32
  c.data.tag_vocab_size = 4585
  c.data.god_top_k = 1

  m = c.model
  m.vision.update(family="blip2", image_size=224, patch_size=14, hidden_size=1408,
                  num_layers=39, num_heads=16, mlp_dim=6144, layer_norm_eps=1e-6,
                  hidden_act="gelu", qkv_bias=True)
  m.qformer.update(num_query_tokens=32, hidden_size=768, num_layers=12, num_heads=12,
                   intermediate_size=3072, cross_attention_frequency=2,
                   encoder_hidden_size=1408, layer_norm_eps=1e-12, hidden_act="gelu",
                   max_position_embeddings=512, vocab_size=30522)
  m.llm.update(family="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120,
               num_layers=24, num_decoder_layers=24, num_heads=32,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               dense_act_fn="gelu", is_gated_act=True, layer_norm_epsilon=1e-6,
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)
  m.clip_text.update(vocab_size=49408, hidden_size=768, num_layers=12, num_heads=12,
                     intermediate_size=3072, max_position_embeddings=77,
                     layer_norm_eps=1e-5, hidden_act="quick_gelu", eos_token_id=49407,
                     projection_dim=768)
  m.tag_threshold = tag_threshold
  m.dtype = "float32"
  m.frozen_dtype = "bfloat16"
  m.remat = True
  m.scan_layers = True
  m.pairwise_form = "chunked"

  c.init.blip2 = "blip2-flan-t5-xl"
  c.init.clip_text = "clip-vit-large-patch14"
  c.trainable = [r"^cross_view/", r"^view_fusion/", r"^qformer/",
                 r"^language_projection/", r"^tagging/", r"^cond_", r"^multi_",
                 r"^prompt_vector$"]

  c.optim.update(learning_rate=1e-4, weight_decay=0.05, schedule="cosine",
                 warmup_steps=1000)
  c.train.per_device_batch_size = 32   # 64 does not fit 16 GiB: see the docstring
  c.train.eval_batch_size = 64
  c.decode.update(num_beams=2, max_new_tokens=20, min_length=1, length_penalty=0.0,
                  repetition_penalty=1.5)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c


def smoke(c):
  """Tiny sizes of every block (same structure), on the synthetic dataset."""
  c.data.name = "synthetic_regions"
  c.data.view_size = 32
  c.data.max_caption_tokens = 16
  c.data.max_prompt_tokens = 16
  c.data.tag_vocab_size = 32
  c.data.synthetic.update(num_train_images=64, num_validation_images=8, num_test_images=8,
                          image_size=64)
  m = c.model
  m.vision.update(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                  mlp_dim=64)
  m.qformer.update(num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=2,
                   intermediate_size=64, encoder_hidden_size=32,
                   max_position_embeddings=32, vocab_size=64)
  m.llm.update(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
               num_decoder_layers=2, num_heads=4)
  m.clip_text.update(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, eos_token_id=1, projection_dim=32)
  m.roi_output_size = 4
  m.cross_view.update(num_heads=2, mlp_ratio=2.0, dropout=0.0)
  m.tagging.update(dim=32, num_heads=2, mlp_dim=64, num_layers=1)
  m.scorer.update(dim=32, num_heads=2, mlp_dim=64, num_layers=1)
  m.pairwise_block_size = 4
  m.frozen_dtype = "float32"
  c.init.blip2 = None
  c.init.clip_text = None
  c.train.per_device_batch_size = 2
  c.train.eval_batch_size = 2
  c.train.total_steps = 4
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.train.eval_max_examples = 4
  c.optim.warmup_steps = 1
  c.decode.max_new_tokens = 8
  return c


def variant(c, arg: str | None, config_file: str):
  if arg in (None, "", "v5e_8"):
    return c
  if arg == "v5e_256":
    c.mesh.update(data=-1, fsdp=16, tensor=1)
    c.model.pairwise_form = "ring"
    c.train.per_device_batch_size = 64   # x 256 chips = 16384 regions per step
    return c
  if arg == "smoke":
    return smoke(c)
  raise ValueError(f"unknown variant '{arg}' of {config_file} (known: v5e_8, v5e_256, smoke)")


def get_config(arg: str | None = None):
  c = reference("visual_genome_regions", tag_threshold=0.8)
  c.train.total_epochs = 5.0
  return variant(c, arg, "configs/vg_t5xl.py")
