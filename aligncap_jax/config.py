"""The one place where every config field and its default lives.

Recipes in `configs/` start from `base_config()` and override fields; code never
holds a second default. `validate(config)` fails fast with a one-line message
naming the field (and the closest existing one for a typo).
"""
from __future__ import annotations

import difflib
import math

import ml_collections


def _cd(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the reference (DESIGN.md) values where they exist."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = _cd(
      name="synthetic_regions",   # base TFDS dataset; GOD output is f"{name}_god"
      data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default / $TFDS_DATA_DIR
      manual_dir=ml_collections.FieldReference(None, field_type=str),  # VG / RefCOCOg downloads
      detections_file=ml_collections.FieldReference(None, field_type=str),  # COCO results json for GOD
      train_split="train",
      eval_split="test",
      view_size=224,               # S: each view is resized to S x S (bicubic)
      num_views=3,                 # j: target + j-1 GOD views
      context_views=True,          # False: every view slot holds the target box (no-GOD ablation)
      # Departure (option): "object" crops each GOD context view to the detected
      # object's own box instead of its union with the target (the paper's "union"),
      # so a neighbour fills its view; the target's place relative to it is the view
      # box outside the view. Needs model.candidate_pool="whole_view".
      context_crop="union",
      # Departure (option): "nearest" puts the selected context views in the order of
      # their object's centre distance to the target's, nearest first (filler slots
      # last), so a slot says how near its object is; "god" keeps GOD's order
      # (random in training, by pHash distance at inference), the paper's.
      context_order="god",
      # Departure (option): > 0 drops, before selection, the context views whose
      # detected object overlaps the target box with IoU >= this (the detector's own
      # box of the target, a few pixels off, which GOD's "union equals the target"
      # rule keeps); 0 keeps them, the paper's rule.
      context_drop_iou=0.0,
      max_caption_tokens=32,
      max_prompt_tokens=32,
      clip_max_tokens=77,
      tag_vocab_size=4585,
      tag_list_file=ml_collections.FieldReference(None, field_type=str),
      god_top_k=1,
      god_score_threshold=0.0,
      prompt_drop_prob=0.5,       # drop the whole tag prompt
      tag_drop_prob=0.5,          # otherwise drop each tag
      # Tokenizers: None means "the one stored with the dataset" (synthetic).
      llm_tokenizer=ml_collections.FieldReference(None, field_type=str),
      clip_tokenizer=ml_collections.FieldReference(None, field_type=str),
      num_workers=0,               # grain worker processes (0: in-process)
      prefetch_buffer_size=2,
      shuffle_buffer_seed=0,
      strict=False,                # dataset build: fail on a corrupt image instead of skip+count
      # VG only: splits file, default <manual_dir>/densecap_splits.json (DenseCap's full
      # splits); a COCO-style region list (GLaMM's test_caption.json) makes `test` that subset
      split_file=ml_collections.FieldReference(None, field_type=str),
      god_num_processes=1,
      god_beam_options="",         # non-empty: run GOD through Apache Beam with these flags
      # pHash of the GOD job: "fast" (PIL's Lanczos arithmetic compiled with numba) or
      # "exact" (PIL crop + resize per box, as imagehash); the hashes are bit-equal.
      god_hash="fast",
      # synthetic dataset generator sizes
      synthetic=_cd(num_train_images=2000, num_validation_images=100,
                    num_test_images=100, image_size=128, seed=0),
  )

  # ---------------------------------------------------------------- model
  c.model = _cd(
      vision=_cd(
          family="blip2",          # blip2 (EVA ViT-g) | clip | siglip
          image_size=224, patch_size=14, hidden_size=1408, num_layers=39,
          num_heads=16, mlp_dim=6144, layer_norm_eps=1e-6,
          hidden_act="gelu", qkv_bias=True,
      ),
      qformer=_cd(
          num_query_tokens=32, hidden_size=768, num_layers=12, num_heads=12,
          intermediate_size=3072, cross_attention_frequency=2,
          encoder_hidden_size=1408, layer_norm_eps=1e-12, hidden_act="gelu",
          max_position_embeddings=512, vocab_size=30522,
      ),
      llm=_cd(
          family="t5",             # t5 | llama (Llama/Qwen2 layout)
          vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
          num_decoder_layers=24, num_heads=32, relative_attention_num_buckets=32,
          relative_attention_max_distance=128, dense_act_fn="gelu",
          is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
          # llama/qwen2 only
          num_key_value_heads=0, rope_theta=10000.0, attention_bias=False,
          bos_token_id=1,
      ),
      clip_text=_cd(
          vocab_size=49408, hidden_size=768, num_layers=12, num_heads=12,
          intermediate_size=3072, max_position_embeddings=77,
          layer_norm_eps=1e-5, hidden_act="quick_gelu", eos_token_id=49407,
          projection_dim=768,
      ),
      roi_output_size=16,
      roi_sampling_ratio=2,
      roi_aligned=False,            # torchvision's default, as the reference
      cross_view=_cd(num_heads=8, mlp_ratio=4.0, dropout=0.1, value_from="candidate"),
      tagging=_cd(dim=256, num_heads=4, mlp_dim=1024, num_layers=2),
      scorer=_cd(dim=256, num_heads=4, mlp_dim=1024, num_layers=2),
      similarity="cross_attention",  # cross_attention (paper) | dot
      pairwise_form="chunked",       # dense | chunked | ring
      pairwise_block_size=16,
      tag_threshold=0.7,
      train_query_tokens=False,       # frozen, as in the reference (DESIGN.md section 10)
      # Departure from the paper (DESIGN.md section 10): mark the target box in every
      # view's patch embeddings with a learned vector (zero-init, trainable), so
      # context views tell the captioner which object is the target and where.
      target_box_prompt=False,
      # RoI-align region of the context views (views 1..j-1): "target_box" (the
      # reference code: the target's box in each view) or "whole_view" (departure:
      # each view over its own extent; view 0 always pools the target box).
      candidate_pool="target_box",
      # Departure (DESIGN.md section 10): add to every token of view v a learned
      # linear embedding (zero-init) of the target box's place in that view
      # (`view_boxes[:, v]` / view size: corners, centre, extent), so the fused
      # tokens say where the target sits in each context view.
      view_box_embedding=False,
      # h > 0: that embedding is an MLP (Dense h -> GELU -> zero-init Dense), so the
      # box's place is read nonlinearly (which side of the target an object lies
      # on is the sign of the larger of |dx|, |dy|); 0 = the linear map.
      view_box_hidden=0,
      # True: that embedding reads the box measured from the view's centre
      # (corners and centre minus 0.5; `ops.box_geometry(centred=True)`), so which
      # side of a view the target lies on is the sign of an input; False: from
      # the view's top-left corner, in [0, 1].
      view_box_centred=False,
      # Departure (DESIGN.md section 10, issue 16): c > 0 appends to every view's
      # tokens c x c more, RoI-pooled over the whole view (the target box alone is
      # pooled into the usual r x r), each plus a learned vector (zero-init) times
      # the fraction of its cell the target box covers; so a context view's
      # neighbour reaches the sampler, marked apart from the target. 0 = off.
      context_tokens=0,
      dtype="float32",                # activations of the trainable blocks
      frozen_dtype="bfloat16",        # frozen towers' params and activations
      remat=True,                     # rematerialise transformer layers
      scan_layers=True,               # scan over identical layers
      dropout=0.0,
  )

  # ---------------------------------------------------------------- init
  c.init = _cd(
      blip2=ml_collections.FieldReference(None, field_type=str),      # HF folder: blip2-flan-t5-xl
      clip_text=ml_collections.FieldReference(None, field_type=str),  # HF folder: clip-vit-large-patch14
      llm=ml_collections.FieldReference(None, field_type=str),        # HF folder of the LLM (default: blip2's)
      hf=ml_collections.FieldReference(None, field_type=str),         # an exported AlignCap folder
  )
  # Regexes over '/'-joined parameter paths; a parameter is trained iff one matches,
  # except the Q-Former's query tokens, which model.train_query_tokens alone decides.
  c.trainable = [
      r"^cross_view/", r"^view_fusion/", r"^qformer/",
      r"^language_projection/", r"^tagging/", r"^cond_", r"^multi_",
      r"^prompt_vector$", r"^target_embedding$", r"^view_box_proj/", r"^context_target_embedding$", r"^context_head/",
  ]

  # ---------------------------------------------------------------- loss
  c.loss = _cd(alpha=0.01, beta=1.0, gamma=0.5, lambda_=0.5,
               asl_gamma_neg=7.0, asl_gamma_pos=0.0, asl_clip=0.05,
               init_log_t=math.log(10.0), init_b=-10.0,
               # Departure (DESIGN.md section 10, issue 16), 0 = off (the paper): weight
               # of a direct caption head, a linear map from the mean latent to every
               # caption position's token, each token's cross-entropy weighted by
               # (1 - p)^context_head_focus, p the captioner's own stop-gradient
               # probability of that token: words the captioner already gets (the
               # target's) fade out, the ones it misses (context) keep their voice.
               # "weighted" (every token, as above) | "hardest" (per region, only the
               # token with the largest weight) | "4" or "4,6" (only those caption
               # positions: a diagnostic that knows the caption grammar).
               context_head=0.0, context_head_focus=1.0, context_head_select="weighted")

  # ---------------------------------------------------------------- optim
  c.optim = _cd(learning_rate=1e-4, weight_decay=0.05, b1=0.9, b2=0.999,
                warmup_steps=1000, schedule="cosine", grad_clip_norm=1.0,
                max_bad_steps_in_row=5)

  # ---------------------------------------------------------------- train
  c.train = _cd(
      per_device_batch_size=64,
      total_epochs=5.0,
      total_steps=ml_collections.FieldReference(None, field_type=int),  # overrides epochs
      log_every_steps=50,
      checkpoint_every_steps=1000,
      eval_every_steps=0,            # N > 0: every N steps and at the end; 0: only at the end; -1: never
      max_checkpoints_to_keep=3,
      eval_batch_size=64,            # per device
      eval_max_examples=0,           # 0: whole split
      # JAX's persistent compilation cache in <workdir>/compilation_cache (train, eval,
      # predict, serve, export): a restart on the same topology and versions loads the
      # compiled steps instead of compiling them. False: off.
      compilation_cache=True,
      # Compiler settings (benchmarks/tpu_compile.py measures them; README "TPU"):
      # XLA's effort levels for every step this process compiles, "" / 0.0 = XLA's
      # defaults. xla_exec_time_effort in [-1, 1]: -1 makes the TPU compiler search
      # far less (vg_t5xl train step on v5e-8: 6.6x faster compile, step speed
      # unmeasured). tpu_windowed_einsum=False: fsdp's all-gather / reduce-scatter
      # matmuls without windowed-einsum loops (TPU only; less memory, less overlap).
      xla_optimization_level="",
      xla_exec_time_effort=0.0,
      tpu_windowed_einsum=True,
  )

  # ---------------------------------------------------------------- decode
  # contrastive_alpha a > 0: visual contrastive decoding (Leng et al., CVPR 2024; beyond
  # the paper), logits (1 + a) * logits(views) - a * logits(every view = the target box).
  c.decode = _cd(num_beams=2, max_new_tokens=20, min_length=1,
                 length_penalty=0.0, repetition_penalty=1.5, contrastive_alpha=0.0)

  # ---------------------------------------------------------------- eval
  # `--mode eval`: "captions" = BLEU-4/METEOR/ROUGE-L/CIDEr on the ground-truth
  # boxes; "densecap" = DenseCap mAP (jcjohnson/densecap eval_utils.lua) into
  # eval/densecap.json, with the ground-truth boxes as prompts (boxes="gt", each
  # region scored by its caption's sequence score) or a detector's boxes
  # (boxes="detections": `detections_file`, COCO results json; None = the GOD
  # records' own objects, the simulated detector on the synthetic set).
  c.eval = _cd(
      protocol="captions",            # captions | densecap
      boxes="gt",                     # densecap: gt | detections
      detections_file=ml_collections.FieldReference(None, field_type=str),
      detection_score="detection",    # detection | detection_x_caption (x the caption's score)
      iou_convention="plus_one",      # plus_one (the Lua reference) | continuous
  )

  # ---------------------------------------------------------------- serve
  # `Captioner` and `--mode serve`: padded batch buckets dp * 2^k up to max_batch
  # regions are compiled at load; the server collects requests for max_wait_ms.
  c.serve = _cd(max_batch=32, max_wait_ms=5.0, max_queue=64, max_boxes=16,
                max_bytes=8 * 1024 * 1024)

  # ---------------------------------------------------------------- mesh
  c.mesh = _cd(data=-1, fsdp=1, tensor=1)   # -1: all remaining devices
  # (logical axis, mesh axes) pairs; models only use logical names.
  c.logical_axis_rules = [
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("length", None),
      ("layers", None),
      ("tags", None),
  ]
  return c


def _all_paths(cfg, prefix=""):
  out = []
  for k in cfg.keys():
    v = cfg[k]
    path = f"{prefix}{k}"
    out.append(path)
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_all_paths(v, path + "."))
  return out


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming any field that the base config does not know."""
  known = set(_all_paths(base_config()))
  for path in _all_paths(config):
    if path not in known:
      close = difflib.get_close_matches(path, sorted(known), n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ValueError(f"unknown config field '{path}'{hint}")


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for unknown fields and impossible values."""
  check_fields(config)
  d, m, t, o = config.data, config.model, config.train, config.optim

  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"config field '{field}': {msg}")

  need(o.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {o.learning_rate}")
  need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  need(d.num_views >= 1, "data.num_views", f"j must be >= 1, got {d.num_views}")
  need(d.god_top_k >= 0, "data.god_top_k", f"top_k must be >= 0, got {d.god_top_k}")
  need(d.god_hash in ("fast", "exact"), "data.god_hash",
       f"must be 'fast' or 'exact', got {d.god_hash!r}")
  need(t.xla_optimization_level in ("", "O0", "O1", "O2", "O3"), "train.xla_optimization_level",
       f"must be '' (XLA's default) or one of O0-O3, got {t.xla_optimization_level!r}")
  need(-1.0 <= t.xla_exec_time_effort <= 1.0, "train.xla_exec_time_effort",
       f"must be in [-1, 1] (0: XLA's default), got {t.xla_exec_time_effort}")
  need(t.per_device_batch_size >= 1, "train.per_device_batch_size",
       f"must be >= 1, got {t.per_device_batch_size}")
  need(m.similarity in ("cross_attention", "dot"), "model.similarity",
       f"must be 'cross_attention' or 'dot', got {m.similarity!r}")
  need(m.pairwise_form in ("dense", "chunked", "ring"), "model.pairwise_form",
       f"must be 'dense', 'chunked' or 'ring', got {m.pairwise_form!r}")
  need(m.candidate_pool in ("target_box", "whole_view"), "model.candidate_pool",
       f"must be 'target_box' or 'whole_view', got {m.candidate_pool!r}")
  need(d.context_crop in ("union", "object"), "data.context_crop",
       f"must be 'union' or 'object', got {d.context_crop!r}")
  need(d.context_crop != "object" or m.candidate_pool == "whole_view", "data.context_crop",
       "'object' views do not contain the target box; set model.candidate_pool='whole_view'")
  need(0.0 <= d.context_drop_iou <= 1.0, "data.context_drop_iou",
       f"must be in [0, 1] (0 = off), got {d.context_drop_iou}")
  need(d.context_order in ("god", "nearest"), "data.context_order",
       f"must be 'god' or 'nearest', got {d.context_order!r}")
  need(m.view_box_hidden >= 0, "model.view_box_hidden",
       f"must be >= 0 (0 = a linear map), got {m.view_box_hidden}")
  need(m.view_box_embedding or not m.view_box_centred, "model.view_box_centred",
       "has no effect without model.view_box_embedding=True")
  need(m.context_tokens >= 0, "model.context_tokens",
       f"must be >= 0 (0 = off), got {m.context_tokens}")
  need(m.cross_view.value_from in ("candidate", "target"), "model.cross_view.value_from",
       f"must be 'candidate' or 'target', got {m.cross_view.value_from!r}")
  need(m.llm.family in ("t5", "llama"), "model.llm.family",
       f"must be 't5' or 'llama', got {m.llm.family!r}")
  need(m.vision.family in ("blip2", "clip", "siglip"), "model.vision.family",
       f"must be 'blip2', 'clip' or 'siglip', got {m.vision.family!r}")
  need(d.view_size % m.vision.patch_size == 0, "data.view_size",
       f"{d.view_size} is not a multiple of model.vision.patch_size={m.vision.patch_size}")
  need(0 <= d.prompt_drop_prob <= 1, "data.prompt_drop_prob", "must be in [0, 1]")
  need(0 <= d.tag_drop_prob <= 1, "data.tag_drop_prob", "must be in [0, 1]")
  need(config.loss.context_head >= 0, "loss.context_head",
       f"must be >= 0 (0: off), got {config.loss.context_head}")
  sel = config.loss.context_head_select
  need(sel in ("weighted", "hardest") or all(x.strip().isdigit() and
                                            int(x) < d.max_caption_tokens for x in sel.split(",")),
       "loss.context_head_select", "must be 'weighted', 'hardest' or comma-separated caption "
       f"positions below data.max_caption_tokens={d.max_caption_tokens}, got {sel!r}")
  need(config.loss.context_head_focus >= 0, "loss.context_head_focus",
       f"must be >= 0, got {config.loss.context_head_focus}")
  need(config.decode.contrastive_alpha >= 0, "decode.contrastive_alpha",
       f"must be >= 0 (0: off), got {config.decode.contrastive_alpha}")
  for ax in ("data", "fsdp", "tensor"):
    v = config.mesh[ax]
    need(v == -1 or v >= 1, f"mesh.{ax}", f"must be -1 or >= 1, got {v}")
  e = config.eval
  need(e.protocol in ("captions", "densecap"), "eval.protocol",
       f"must be 'captions' or 'densecap', got {e.protocol!r}")
  need(e.boxes in ("gt", "detections"), "eval.boxes",
       f"must be 'gt' or 'detections', got {e.boxes!r}")
  need(e.detection_score in ("detection", "detection_x_caption"), "eval.detection_score",
       f"must be 'detection' or 'detection_x_caption', got {e.detection_score!r}")
  need(e.iou_convention in ("plus_one", "continuous"), "eval.iou_convention",
       f"must be 'plus_one' or 'continuous', got {e.iou_convention!r}")
  s = config.serve
  for field in ("max_batch", "max_queue", "max_boxes", "max_bytes"):
    need(s[field] >= 1, f"serve.{field}", f"must be >= 1, got {s[field]}")
  need(s.max_wait_ms >= 0, "serve.max_wait_ms", f"must be >= 0, got {s.max_wait_ms}")
