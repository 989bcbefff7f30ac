"""Cross-view block, view fusion and tagging head against hand-written numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aligncap_jax.models import cross_view, tagging


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _attn(q_in, k_in, v_in, p, heads, mask=None):
  def proj(x, pp):
    return np.einsum("lc,chd->lhd", x, pp["kernel"]) + pp["bias"]
  q, k, v = proj(q_in, p["query"]), proj(k_in, p["key"]), proj(v_in, p["value"])
  d = q.shape[-1]
  out = np.zeros_like(q)
  for h in range(heads):
    s = q[:, h] @ k[:, h].T / np.sqrt(d)
    if mask is not None:
      s = np.where(mask[None, :], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[:, h] = w @ v[:, h]
  return np.einsum("lhd,hdc->lc", out, p["out"]["kernel"]) + p["out"]["bias"]


def _silu(x):
  return x / (1 + np.exp(-x))


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x)))


@pytest.mark.parametrize("value_from", ["candidate", "target"])
def test_cross_view_block_matches_numpy(value_from):
  rng = np.random.default_rng(0)
  b, length, c, heads = 2, 5, 8, 2
  cand = rng.normal(size=(b, length, c)).astype(np.float32)
  tgt = rng.normal(size=(b, length, c)).astype(np.float32)
  block = cross_view.CrossViewBlock(num_heads=heads, mlp_ratio=2.0, dropout=0.5,
                                    value_from=value_from)
  params = nn.unbox(block.init(jax.random.key(0), cand, tgt))["params"]
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  got = np.asarray(block.apply({"params": params}, cand, tgt, deterministic=True))
  p = jax.tree.map(np.asarray, params)
  for i in range(b):
    cn, tn = _ln(cand[i], p["norm_candidate"]), _ln(tgt[i], p["norm_target"])
    v = cn if value_from == "candidate" else tn
    x = cand[i] + _attn(cn, tn, v, p["attn"], heads)
    h = _ln(x, p["norm_mlp"])
    h = _silu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
    h = _silu(h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"])
    h = h @ p["mlp"]["fc3"]["kernel"] + p["mlp"]["fc3"]["bias"]
    np.testing.assert_allclose(got[i], x + h, rtol=1e-4, atol=1e-5)


def test_cross_view_dropout_only_in_training():
  x = jax.random.normal(jax.random.key(2), (1, 4, 8))
  y = jax.random.normal(jax.random.key(3), (1, 4, 8))
  block = cross_view.CrossViewBlock(num_heads=2, dropout=0.5)
  params = block.init(jax.random.key(0), x, y)
  a = block.apply(params, x, y, deterministic=True)
  b = block.apply(params, x, y, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)


def test_cross_view_rejects_unknown_value_source():
  block = cross_view.CrossViewBlock(num_heads=2, value_from="query")
  with pytest.raises(ValueError, match="value_from"):
    block.init(jax.random.key(0), jnp.ones((1, 2, 4)), jnp.ones((1, 2, 4)))


def test_view_fusion_matches_numpy():
  rng = np.random.default_rng(1)
  views = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  mod = cross_view.ViewFusion()
  params = jax.tree.map(np.asarray, nn.unbox(mod.init(jax.random.key(0), views))["params"])
  got = mod.apply({"params": params}, views)
  cat = np.concatenate([views[:, 0], views[:, 1], views[:, 2]], axis=-1)   # [B, L, 3C]
  h = np.maximum(cat @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0)
  want = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tagging_head_matches_numpy_and_has_no_tag_interaction():
  rng = np.random.default_rng(2)
  b, q, h, v, dclip = 2, 3, 8, 5, 6
  latents = rng.normal(size=(b, q, h)).astype(np.float32)
  tags = rng.normal(size=(v, dclip)).astype(np.float32)
  head = tagging.TaggingHead(dim=8, num_heads=2, mlp_dim=16, num_layers=2)
  params = jax.tree.map(np.asarray, nn.unbox(head.init(jax.random.key(0), latents, tags))["params"])
  logits, adapted = head.apply({"params": params}, latents, tags)
  assert logits.shape == (b, v) and adapted.shape == (v, 8)
  t = tags @ params["tag_adapter"]["kernel"] + params["tag_adapter"]["bias"]
  for i in range(b):
    mem = latents[i] @ params["latent_proj"]["kernel"] + params["latent_proj"]["bias"]
    x = t
    for layer in ("layer0", "layer1"):
      lp = params[layer]
      x = _ln(x + _attn(x, mem, mem, lp["attn"], 2), lp["ln_attn"], 1e-12)
      f = _gelu(x @ lp["ffn"]["fc1"]["kernel"] + lp["ffn"]["fc1"]["bias"])
      f = f @ lp["ffn"]["fc2"]["kernel"] + lp["ffn"]["fc2"]["bias"]
      x = _ln(x + f, lp["ln_ffn"], 1e-12)
    want = (x @ params["classifier"]["kernel"] + params["classifier"]["bias"])[:, 0]
    np.testing.assert_allclose(logits[i], want, rtol=1e-4, atol=1e-5)
  # No self-attention between tags: a tag's logit ignores the other tags.
  logits_sub, _ = head.apply({"params": params}, latents, tags[:2])
  np.testing.assert_allclose(logits_sub, logits[:, :2], rtol=1e-5, atol=1e-6)
