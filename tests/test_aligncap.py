"""The assembled AlignCap model on the tiny config: losses, forms, decoding."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aligncap_jax.models import aligncap

V = 6
ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**model_overrides):
  spec = importlib.util.spec_from_file_location("tiny_cfg", ROOT / "configs" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.update(model_overrides)
  return c


def make_batch(c, b=8, seed=0):
  rng = np.random.default_rng(seed)
  batch = aligncap.dummy_batch(c, b, V)
  batch["views"] = rng.integers(0, 256, batch["views"].shape).astype(np.uint8)
  s = c.data.view_size
  x1 = rng.uniform(0, s / 2, (b, c.data.num_views, 2))
  batch["view_boxes"] = np.concatenate([x1, x1 + rng.uniform(2, s / 2, x1.shape)], -1).astype(np.float32)
  t = c.data.max_caption_tokens
  batch["caption_tokens"] = rng.integers(5, 40, (b, t)).astype(np.int32)
  lens = rng.integers(3, t, b)
  batch["caption_mask"] = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
  batch["caption_tokens"] *= batch["caption_mask"]
  batch["clip_tokens"][:, :4] = rng.integers(5, 40, (b, 4))
  batch["clip_tokens"][:, 4] = c.model.clip_text.eos_token_id
  batch["clip_mask"] = (np.arange(77)[None] < 5).repeat(b, 0).astype(np.int32)
  batch["tag_labels"] = (rng.random((b, V)) < 0.3).astype(np.float32)
  batch["prompt_tokens"][:, :3] = [7, 4, 1]
  batch["prompt_mask"] = (np.arange(c.data.max_prompt_tokens)[None] < 3).repeat(b, 0).astype(np.int32)
  return batch


def init(c, batch):
  model = aligncap.build_model(c, V)
  te = jnp.asarray(np.random.default_rng(1).normal(size=(V, c.model.clip_text.hidden_size)),
                   jnp.float32)
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, batch, te))(
      jax.random.key(0))
  return model, nn.unbox(variables)["params"], te


def loss_fn(model, te):
  def f(params, batch):
    return model.apply({"params": params}, batch, te, train=False)
  return f


@pytest.fixture(scope="module")
def base():
  c = tiny_config(pairwise_form="dense")
  batch = make_batch(c)
  model, params, te = init(c, batch)
  return c, batch, model, params, te


def value_and_grad_fn(model, te):
  """Jitted ((loss, metrics), gradients): one compile gives both."""
  return jax.jit(jax.value_and_grad(loss_fn(model, te), has_aux=True))


@pytest.fixture(scope="module")
def base_value_and_grad(base):
  """((loss, metrics), gradients) of `base` (the dense form), shared by the tests."""
  c, batch, model, params, te = base
  return value_and_grad_fn(model, te)(params, batch)


def test_losses_finite_and_every_trainable_block_gets_gradient(base, base_value_and_grad):
  c = base[0]
  (loss, metrics), grads = base_value_and_grad
  assert set(metrics) == {"loss", "loss_cap", "loss_tag", "loss_cond", "loss_multi"}
  for k, v in metrics.items():
    assert np.isfinite(v), k
  lc = c.loss
  total = (lc.alpha * metrics["loss_tag"] + lc.beta * metrics["loss_cap"]
           + lc.gamma * metrics["loss_cond"] + lc.lambda_ * metrics["loss_multi"])
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-6)
  for name in ("vision", "cross_view", "view_fusion", "qformer", "language_projection",
               "tagging", "cond_region", "cond_scorer", "multi_scorer", "multi_region_proj",
               "prompt_vector", "cond_log_t", "multi_b", "llm"):
    norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads[name]))
    assert norm > 0, f"no gradient reaches {name}"


def test_padding_regions_do_not_change_caption_and_tag_losses(base):
  c, batch, model, params, te = base
  f = jax.jit(loss_fn(model, te))
  _, m1 = f(params, batch)
  b2 = dict(batch)
  b2["caption_tokens"] = batch["caption_tokens"].copy()
  b2["valid"] = batch["valid"].copy()
  b2["valid"][-1] = 0
  b2["caption_tokens"][-1] = 9
  b2["tag_labels"] = batch["tag_labels"].copy()
  b2["tag_labels"][-1] = 1 - b2["tag_labels"][-1]
  _, m2 = f(params, b2)
  _, m3 = f(params, {**b2, "caption_tokens": batch["caption_tokens"], "tag_labels": batch["tag_labels"]})
  np.testing.assert_allclose(m2["loss_cap"], m3["loss_cap"], rtol=1e-6)
  np.testing.assert_allclose(m2["loss_tag"], m3["loss_tag"], rtol=1e-6)
  assert not np.isclose(m1["loss_cap"], m2["loss_cap"])


def test_padding_regions_take_no_part_in_the_pairwise_losses(base):
  """L_cond and L_multi with the last region marked padding equal those of the
  batch without it."""
  c, batch, model, params, te = base
  f = jax.jit(loss_fn(model, te))
  padded = {**batch, "valid": batch["valid"].copy()}
  padded["valid"][-1] = 0
  _, m_pad = f(params, padded)
  _, m_sub = f(params, {k: v[:-1] for k, v in batch.items()})
  _, m_all = f(params, batch)
  for k in ("loss_cond", "loss_multi"):
    # float32 through the whole tiny model (~10 layers) at another batch shape:
    # rounding only, well under 1e-4. One region of 8 leaking in moves it by ~1e-2
    # (the loss at init is mostly the positive pair, log(1 + e^10)).
    np.testing.assert_allclose(m_pad[k], m_sub[k], rtol=1e-4)
    assert abs(m_all[k] - m_sub[k]) > 2e-3 * abs(m_sub[k]), k


def test_chunked_and_ring_forms_equal_dense_with_the_papers_scorer(base, base_value_and_grad):
  """Values and gradients of the whole model; the dot form is covered in test_pairwise_sigmoid.

  `base` is the dense form with the paper's scorer (similarity="cross_attention").
  """
  c, batch, _, params, te = base
  assert c.model.similarity == "cross_attention" and c.model.pairwise_form == "dense"
  (_, dense_m), g_dense = base_value_and_grad
  forms = ("chunked", "ring")
  models = [aligncap.build_model(tiny_config(similarity=c.model.similarity, pairwise_form=form,
                                             pairwise_block_size=3), V) for form in forms]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    # One program for both forms: everything but the pairwise losses is the same
    # computation on the same inputs, which XLA then compiles (and runs) once.
    both = jax.jit(lambda p, b: [jax.value_and_grad(loss_fn(m, te), has_aux=True)(p, b)
                                 for m in models])(params, batch)
  for form, ((_, m), g) in zip(forms, both):
    for k in ("loss_cond", "loss_multi"):
      np.testing.assert_allclose(m[k], dense_m[k], rtol=1e-5, err_msg=f"{form} {k}")
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_dense)):
      assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(float(jnp.max(jnp.abs(b))), 1e-6) + 1e-7


# A pre-tokenised tag table (vocabulary order) with distinct ids, and the
# prompt's separators; with at most 6 tags the prompt stays under max_prompt_tokens.
TAG_TOKENS = [[11], [12, 13], [14], [15, 16], [17], [18]]
COMMA, BAR = 3, 4


def tag_table(c):
  tokens = np.zeros((V, max(map(len, TAG_TOKENS))), np.int32)
  for v, ids in enumerate(TAG_TOKENS):
    tokens[v, :len(ids)] = ids
  return {"tokens": tokens, "lens": np.asarray([len(t) for t in TAG_TOKENS], np.int32),
          "comma_id": np.asarray(COMMA, np.int32), "bar_id": np.asarray(BAR, np.int32),
          "eos_id": np.asarray(c.model.llm.eos_token_id, np.int32)}


def expected_prompt(c, tag_probs, threshold):
  """Section 3's prompt written out: the tags with sigmoid > threshold in vocabulary
  order, ',' between them, then '|' and EOS (no tags: '|' and EOS); right-padded."""
  n = c.data.max_prompt_tokens
  tokens = np.zeros((len(tag_probs), n), np.int32)
  for row, p in enumerate(np.asarray(tag_probs)):
    words = [TAG_TOKENS[v] for v in range(V) if p[v] > threshold]
    ids = [i for w in words for i in w + [COMMA]][:-1] + [BAR, c.model.llm.eos_token_id]
    assert len(ids) < n
    tokens[row, :len(ids)] = ids
  return tokens, (tokens != 0).astype(np.int32)


def threshold_between(tag_probs):
  """A threshold half-way between the two middle probabilities, so that rows select
  different tags and no probability sits within float32 noise of it."""
  p = np.sort(np.asarray(tag_probs).ravel())
  lo, hi = p[len(p) // 2 - 1], p[len(p) // 2]
  assert hi - lo > 1e-5, (lo, hi)
  return float(lo + hi) / 2


def generate_fn(model, te, table, **kw):
  return jax.jit(lambda p, b: model.apply({"params": p}, b, te, table,
                                          method=aligncap.AlignCap.generate, **kw))


def greedy_by_training_forward(model, params, batch, te, prompt, prompt_mask, steps,
                               repetition_penalty=1.0):
  """Greedy decoding by the training forward fed its own output.

  Step i runs `caption_logits` (the logits L_cap scores) on the batch with the
  given prompt and the i tokens generated so far as caption, and takes the argmax
  at caption slot i (after the repetition penalty on the ids generated so far, if
  any). Returns (tokens int32[B, steps], padded after EOS as `generate` does; the
  smallest gap between the best and second-best score of any step).
  """
  llm = model.config.model.llm
  f = jax.jit(lambda p, b: model.apply({"params": p}, b,
                                       method=aligncap.AlignCap.caption_logits))
  b, t = prompt.shape[0], model.config.data.max_caption_tokens
  tokens = np.full((b, t), llm.pad_token_id, np.int32)
  done = np.zeros(b, bool)
  margin = np.inf
  for i in range(steps):
    cap_mask = np.broadcast_to((np.arange(t) < i).astype(np.int32), (b, t))
    logits = np.array(f(params, {**batch, "prompt_tokens": prompt, "prompt_mask": prompt_mask,
                                 "caption_tokens": tokens, "caption_mask": cap_mask})[:, i])
    for r in range(b):
      for tok in set(tokens[r, :i].tolist()):
        logits[r, tok] = (logits[r, tok] * repetition_penalty if logits[r, tok] < 0
                          else logits[r, tok] / repetition_penalty)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margin = min([margin] + list(top2[~done, 1] - top2[~done, 0]))
    tokens[:, i] = np.where(done, llm.pad_token_id, logits.argmax(-1))
    done |= tokens[:, i] == llm.eos_token_id
  return tokens[:, :steps], margin


# The KV-cached decode and the full forward differ in float32 rounding only:
# ~1e-6 relative through a few width-32 layers, on logits of O(1) and attention
# scores of O(10) (the sharpened ones below), so ~1e-5 at worst. An argmax
# comparison is meaningful (and CPU-independent) when every step's best score leads
# the second by more than this.
ARGMAX_MARGIN = 1e-4


def scale_projections(params, factors, within=None):
  """Multiplies the kernels (and biases) of the named projections, e.g. {"o": 10.0},
  optionally only below a module named `within`."""
  hits = []

  def scale(path, x):
    keys = [getattr(k, "key", None) for k in path]
    if len(keys) > 1 and keys[-2] in factors and (within is None or within in keys):
      hits.append(keys)
      return x * factors[keys[-2]]
    return x

  params = jax.tree_util.tree_map_with_path(scale, params)
  assert hits, (factors, within)
  return params


def test_generate_shapes_and_prompt_from_predicted_tags(base):
  c, batch, model, params, te = base
  # T5's init (projections std 0.02, embeddings std 1) leaves the tiny decoder deaf
  # to its encoder: every region would decode the same caption whatever its prompt.
  params = {**params, "llm": scale_projections(params["llm"], {"v": 10.0, "o": 10.0},
                                               within="cross_attn")}
  table = tag_table(c)
  out = generate_fn(model, te, table, num_beams=2, max_new_tokens=5)(params, batch)
  assert out["tokens"].shape == (8, 5) and out["tokens"].dtype == jnp.int32
  assert out["scores"].shape == (8,) and np.all((out["scores"] > 0) & (out["scores"] <= 1))
  assert out["tag_probs"].shape == (8, V)

  # The prompt decoded from holds the tags whose sigmoid exceeds the threshold.
  threshold = threshold_between(out["tag_probs"])
  steps = 6
  results = {}
  for name, thr in (("predicted", threshold), ("no tags", 1.01)):
    m = aligncap.build_model(tiny_config(pairwise_form="dense", tag_threshold=thr), V)
    got = generate_fn(m, te, table, num_beams=1, max_new_tokens=steps, min_length=0,
                      repetition_penalty=1.0)(params, batch)
    want_prompt, want_mask = expected_prompt(c, got["tag_probs"], thr)
    np.testing.assert_array_equal(got["prompt_tokens"], want_prompt, err_msg=name)
    np.testing.assert_array_equal(got["prompt_mask"], want_mask, err_msg=name)
    # ... and it is the prompt the captions were decoded from.
    want, margin = greedy_by_training_forward(m, params, batch, te, want_prompt, want_mask,
                                              steps)
    assert margin > ARGMAX_MARGIN, (name, margin)
    np.testing.assert_array_equal(got["tokens"], want, err_msg=name)
    results[name] = got
  # Rows selected different numbers of tags; above 1 no tag is selected.
  assert len(set(results["predicted"]["prompt_mask"].sum(1).tolist())) > 1
  assert np.all(results["no tags"]["prompt_mask"].sum(1) == 2)
  assert not np.array_equal(results["predicted"]["tokens"], results["no tags"]["tokens"])


@pytest.mark.parametrize("repetition_penalty", [1.0, 3.0])
def test_decoder_only_greedy_equals_training_forward_argmax(repetition_penalty):
  """Llama-family LLM, prompts shorter than max_prompt_tokens (right-padded in the
  batch): decoding gives every token the position and attention it has in training."""
  c = tiny_config(pairwise_form="dense")
  c.model.llm.update(family="llama", num_layers=2, num_key_value_heads=2,
                     attention_bias=True, tie_word_embeddings=False)
  batch = make_batch(c)
  model, params, te = init(c, batch)
  # With projections of std 0.02 attention is near uniform, so positions would hardly
  # matter; sharpen it (scores x400) and spread the logits (x10).
  params = {**params, "llm": scale_projections(
      params["llm"], {"q_proj": 20.0, "k_proj": 20.0, "lm_head": 10.0})}
  table = tag_table(c)
  steps = 8
  probs = generate_fn(model, te, table, num_beams=1, max_new_tokens=1)(params, batch)[
      "tag_probs"]
  c.model.tag_threshold = threshold_between(probs)
  model = aligncap.build_model(c, V)
  got = generate_fn(model, te, table, num_beams=1, max_new_tokens=steps, min_length=0,
                    repetition_penalty=repetition_penalty)(params, batch)
  prompt, prompt_mask = expected_prompt(c, got["tag_probs"], c.model.tag_threshold)
  np.testing.assert_array_equal(got["prompt_tokens"], prompt)
  lens = prompt_mask.sum(1)
  assert np.all(lens < c.data.max_prompt_tokens) and len(set(lens.tolist())) > 1
  want, margin = greedy_by_training_forward(model, params, batch, te, prompt, prompt_mask,
                                            steps, repetition_penalty)
  assert margin > ARGMAX_MARGIN, margin
  np.testing.assert_array_equal(got["tokens"], want)


def test_context_head_loss_is_the_captioner_weighted_direct_head_formula():
  """loss.context_head (issue 16's departure): a linear head on the mean latent
  predicts every caption token, each token's cross-entropy weighted by
  (1 - p_captioner)^focus; the total gains weight * that term."""
  c = tiny_config(pairwise_form="dense")
  c.loss.context_head, c.loss.context_head_focus = 0.5, 2.0
  batch = make_batch(c)
  batch["valid"][-2:] = 0
  model, params, te = init(c, batch)
  assert "context_head" in params
  (loss, metrics), grads = value_and_grad_fn(model, te)(params, batch)
  latents = model.apply({"params": params}, batch, True,
                        method=lambda m, b, d: m._region_latents(b, d))
  cap_logits = model.apply({"params": params}, batch, method=aligncap.AlignCap.caption_logits)
  z = np.asarray(latents, np.float64).mean(1)
  k = np.asarray(params["context_head"]["kernel"], np.float64)
  bias = np.asarray(params["context_head"]["bias"], np.float64)
  b, t = batch["caption_tokens"].shape
  head = (z @ k + bias).reshape(b, t, -1)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  tok = batch["caption_tokens"][..., None]
  nll = -np.take_along_axis(log_softmax(head), tok, -1)[..., 0]
  p = np.exp(np.take_along_axis(log_softmax(np.asarray(cap_logits, np.float64)), tok, -1)[..., 0])
  mask = batch["caption_mask"] * batch["valid"][:, None]
  w = (1 - p) ** 2 * mask
  want = np.sum(nll * w) / batch["valid"].sum()
  np.testing.assert_allclose(metrics["loss_context"], want, rtol=1e-4)
  lc = c.loss
  paper = (lc.alpha * metrics["loss_tag"] + lc.beta * metrics["loss_cap"]
           + lc.gamma * metrics["loss_cond"] + lc.lambda_ * metrics["loss_multi"])
  np.testing.assert_allclose(metrics["loss"], paper + 0.5 * metrics["loss_context"], rtol=1e-6)
  for name in ("context_head", "qformer", "vision"):
    assert sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads[name])) > 0, name


def test_context_head_weights_select_hardest_token_or_positions():
  p = np.asarray([[0.9, 0.2, 0.5, 0.1], [0.3, 0.95, 0.6, 0.0]], np.float32)
  mask = np.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
  np.testing.assert_allclose(aligncap.context_head_weights(p, mask, 2.0, "weighted"),
                             (1 - p) ** 2 * mask, rtol=1e-6)
  # row 0: position 3 (p 0.1) is padding, so position 1 is the hardest; row 1: position 3
  np.testing.assert_array_equal(aligncap.context_head_weights(p, mask, 1.0, "hardest"),
                                [[0, 1, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(aligncap.context_head_weights(p, mask, 1.0, "0,3"),
                                [[1, 0, 0, 0], [1, 0, 0, 1]])


def test_context_head_is_off_by_default():
  c = tiny_config(pairwise_form="dense")
  assert c.loss.context_head == 0
  model = aligncap.build_model(c, V)
  shapes = jax.eval_shape(
      lambda k: model.init({"params": k, "dropout": k}, make_batch(c),
                           jnp.zeros((V, c.model.clip_text.hidden_size))), jax.random.key(0))
  assert "context_head" not in shapes["params"]


@pytest.mark.parametrize("hidden", [0, 16])
def test_view_box_embedding_adds_the_formula_to_every_token_of_its_view(hidden):
  """model.view_box_embedding: view v's tokens + proj(geometry of view_boxes[:, v]),
  geometry (corners, centre, extent) / S; with model.view_box_hidden = h > 0 the
  map is Dense(h) -> exact GELU -> Dense."""
  c = tiny_config(pairwise_form="dense", view_box_embedding=True, view_box_hidden=hidden)
  batch = make_batch(c)
  model, params, _ = init(c, batch)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda x: x, params)
  w = params["view_box_proj"]["kernel"]
  params["view_box_proj"]["kernel"] = jnp.asarray(rng.normal(size=w.shape), w.dtype)
  params["view_box_proj"]["bias"] = jnp.asarray(rng.normal(size=w.shape[-1:]), w.dtype)
  got = model.apply({"params": params}, batch, method=aligncap.AlignCap.view_tokens)
  off_c = tiny_config(pairwise_form="dense")
  off = aligncap.build_model(off_c, V)
  off_params = {k: v for k, v in params.items() if not k.startswith("view_box_")}
  base_tokens = off.apply({"params": off_params}, batch, method=aligncap.AlignCap.view_tokens)
  b = np.asarray(batch["view_boxes"], np.float64) / c.data.view_size
  geo = np.concatenate([b, (b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)
  if hidden:
    h = params["view_box_hidden"]
    x = geo @ np.asarray(h["kernel"], np.float64) + np.asarray(h["bias"], np.float64)
    geo = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False), np.float64)
  emb = geo @ np.asarray(params["view_box_proj"]["kernel"], np.float64) + np.asarray(
      params["view_box_proj"]["bias"], np.float64)
  want = np.asarray(base_tokens, np.float64) + emb[:, :, None]
  # float32 sums of a few terms of magnitude ~10: a few ulp of the largest.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
