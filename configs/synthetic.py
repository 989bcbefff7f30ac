"""AlignCap on the embedded synthetic region-caption dataset (the default run).

Reproduces: the whole AlignCap pipeline (synthetic TFDS dataset -> GOD views ->
grain -> ViT + RoI-align + cross-view block + Q-Former + tagging head + L_cond +
L_multi + T5 -> beam search -> pycocoevalcap) on 2 CPU cores in minutes. The
backbones are small and trained from scratch (the real configs freeze them);
the CLIP text tower stays frozen at its random init, as a fixed text featuriser.
Seven departures from the paper are on here (and only here; README "Architecture"):
`model.view_box_embedding`, `loss.context_head=10`, object-crop context views
(`data.context_crop="object"`, `model.candidate_pool="whole_view"`), no view made
from the detector's own box of the target (`data.context_drop_iou=0.5`), the
context views nearest object first (`data.context_order="nearest"`), with 3 context
slots (`data.num_views=4`), and the view box embedding through a hidden layer
(`model.view_box_hidden=64`) reading the box from the view's centre
(`model.view_box_centred=True`); `hard` has only the first two. Together they bring
the context into the captions (issue 16; README "Results on the synthetic dataset"
and "Ablation" have the seeds): relation 0.84 +- 0.05 and neighbour (colour and
shape) 0.73 +- 0.11 over seeds 0-2 (relation 0.809 / 0.812 / 0.896; 0.849 +- 0.040
over seeds 0-4, every seed >= 0.80), against 0.25 and 0.05 on the paper's path.

Run:
  python -m aligncap_jax.main --config configs/synthetic.py --workdir workdirs/synthetic --mode train
  python -m aligncap_jax.main --config configs/synthetic.py --workdir workdirs/synthetic --mode eval
Variants: `configs/synthetic.py:dot` (SigLIP-style dot-product similarity instead of
the paper's cross-attention scorer), `configs/synthetic.py:smoke` (a few steps),
`configs/synthetic.py:hard` (the harder benchmark below).
Expected: see README "Results on the synthetic dataset" (CIDEr >= 60 on the test split).

`hard`: the same model and budget on `synthetic_regions_hard`
(`aligncap_jax/data/synthetic_hard.py`, its own TFDS dataset and GOD dataset, so
both variants live in one TFDS_DATA_DIR): 3-8 objects per scene, some
overlapping; 12 colours in close pairs, 8 shapes, 3 sizes, 4 fill patterns; four
paraphrase templates per fact (one per train region, all four as references of a
test target); the neighbour a caption names lies outside the target's box, so
only a context view shows it. `god_top_k = 8` lets every shape class make views.
Counts and image size come from `data.synthetic` as for the default (2,000 train
images build with GOD in ~20 s on 2 cores). Measured on its test split (544
targets): the neighbour lies inside one of the `num_views - 1 = 2` views eval
selects for 64% of targets (num_views 4: 77%, 5: 84%), inside some stored view
for 89% (the detector's misses and box noise take the rest); a constant caption
scores size 0.37, pattern 0.26, colour 0.09, shape 0.12, relation 0.25,
neighbour 0.01, exact match 0. Eval also writes `attr_pattern`.
"""
from aligncap_jax import config as base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.data.name = "synthetic_regions"
  c.data.view_size = 64
  c.data.num_views = 3             # 4 below, with the session-10 departures
  c.data.max_caption_tokens = 16
  c.data.max_prompt_tokens = 16
  c.data.clip_max_tokens = 77
  c.data.tag_vocab_size = 64
  c.data.god_top_k = 4
  c.data.god_score_threshold = 0.3
  c.data.synthetic.num_train_images = 2000
  c.data.synthetic.num_validation_images = 50
  c.data.synthetic.num_test_images = 100
  c.data.synthetic.image_size = 128

  m = c.model
  m.vision.update(family="blip2", image_size=64, patch_size=8, hidden_size=64, num_layers=2,
                  num_heads=4, mlp_dim=128, layer_norm_eps=1e-6, hidden_act="gelu")
  m.qformer.update(num_query_tokens=8, hidden_size=64, num_layers=2, num_heads=4,
                   intermediate_size=128, cross_attention_frequency=1,
                   encoder_hidden_size=64, max_position_embeddings=64, vocab_size=64)
  m.llm.update(family="t5", vocab_size=128, d_model=128, d_kv=32, d_ff=256, num_layers=2,
               num_decoder_layers=2, num_heads=4, dense_act_fn="gelu_new", is_gated_act=True,
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)
  m.clip_text.update(vocab_size=128, hidden_size=64, num_layers=1, num_heads=4,
                     intermediate_size=128, max_position_embeddings=77, eos_token_id=1,
                     projection_dim=64)
  m.roi_output_size = 8
  m.cross_view.update(num_heads=4, mlp_ratio=2.0, dropout=0.0)
  m.tagging.update(dim=64, num_heads=4, mlp_dim=256, num_layers=2)
  m.scorer.update(dim=64, num_heads=4, mlp_dim=256, num_layers=2)
  m.pairwise_form = "chunked"
  m.pairwise_block_size = 16
  m.tag_threshold = 0.5
  m.frozen_dtype = "float32"
  m.scan_layers = False
  m.remat = False
  # Backbones train from scratch here; only the CLIP text tower (and the
  # Q-Former's query tokens, model.train_query_tokens=False as in the reference)
  # stay frozen.
  c.trainable = [r"^(?!clip_text/)"]
  # Departures of this config (DESIGN.md section 10; off in aligncap_jax/config.py
  # and the real configs), issue 16: trained from scratch at this budget, the
  # paper's path leaves the context half of the captions at chance (README
  # "Results on the synthetic dataset"). Where the target sits in each view, as an
  # embedding of its box added to that view's tokens, and a direct head from the
  # mean latent to every caption token, weighted by how poorly the captioner
  # predicts it, carry the relation into the captions.
  m.view_box_embedding = True
  c.loss.context_head = 10.0
  # Third departure (session 9): each GOD context view cropped to the detected
  # object's own box instead of its union with the target, so a neighbour fills
  # its view as the target fills its own, the target's place given by its box in
  # that view's frame (outside it); the context views pooled whole. Relation 0.62
  # +- 0.01 over seeds 0-2 against 0.40 +- 0.11 with union views.
  c.data.context_crop = "object"
  m.candidate_pool = "whole_view"
  # Fourth and fifth (session 10): GOD's pool held the detector's own box of the
  # target (a few pixels off, so its union is not the target and GOD keeps it): an
  # object crop of it is the target again, and the self-detection took a training
  # slot from the neighbour. Dropped (IoU >= 0.5 with the target); the context views
  # go nearest object first, so slot 1 is the nearest object the views show, and 3
  # context slots hold every stored candidate of 90% of the test targets. Relation
  # 0.78 and neighbour 0.68 at seed 0 (0.72 / 0.10 without the drop, 3 views).
  c.data.context_drop_iou = 0.5
  c.data.context_order = "nearest"
  c.data.num_views = 4
  # Sixth (session 11): the view-box embedding through a hidden GELU layer instead
  # of one linear map, so a view's box (where the target sits in it) can be read
  # non-linearly (the relation is the sign of the larger of the centre offsets).
  m.view_box_hidden = 64
  # Seventh (session 12): that box measured from the view's centre (corners and
  # centre minus 0.5), so the target's side of a view is the sign of an input.
  # The latents held the relation (a linear probe reads 0.91, the views' ceiling)
  # while some seeds captioned vertical relations as horizontal; centred, the
  # relation over seeds 0-4 was 0.849 +- 0.040 (every seed >= 0.80) against 0.792
  # +- 0.056 (README "Results on the synthetic dataset").
  m.view_box_centred = True

  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 100
  c.train.per_device_batch_size = 32
  c.train.total_steps = 800
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 400
  c.train.eval_batch_size = 50
  c.decode.update(num_beams=2, max_new_tokens=16)

  if arg == "hard":
    c.data.name = "synthetic_regions_hard"
    c.data.god_top_k = 8          # every shape class makes views
    # The committed ablation (README "Ablation") was measured with union views.
    c.data.context_crop = "union"
    m.candidate_pool = "target_box"
    c.data.context_drop_iou = 0.0
    c.data.context_order = "god"
    c.data.num_views = 3
    m.view_box_hidden = 0
    m.view_box_centred = False
  elif arg == "dot":
    m.similarity = "dot"
  elif arg == "smoke":
    c.train.total_steps = 20
    c.train.log_every_steps = 5
    c.train.checkpoint_every_steps = 10
    c.train.eval_max_examples = 20
  elif arg:
    raise ValueError(f"unknown variant '{arg}' of configs/synthetic.py "
                     "(known: dot, hard, smoke)")
  return c
