"""How distinct L_cond's and L_multi's caption features are: mean and spread of the
pairwise cosine similarity of one training batch's caption features (the frozen
CLIP text tower's pooled output, L_cond's caption side before its trainable
projection; the mean LLM input embedding, L_multi's), split into pairs whose
captions share the target words and pairs that differ only in the context words."""
import sys
import numpy as np
import jax, jax.numpy as jnp
from _checkpoint import load
from aligncap_jax.data import pipeline
c, assets, model, params = load(sys.argv[1:])
it = pipeline.make_train_iterator(c, assets, global_batch_size=256)
b = next(it)
tok = assets.llm_tokenizer


def clip_pooled(m, t, k):
  return m.clip_text(t, k)[1]


def llm_mean(m, t, k):
  e = m.llm.embed(t).astype(jnp.float32)
  w = k[..., None].astype(jnp.float32)
  return jnp.sum(e * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)


words = [" ".join(tok.id_to_token(int(t)) for t, m in zip(row, mk) if m)
         for row, mk in zip(b["caption_tokens"], b["caption_mask"])]
target = [" ".join(w.split()[:4]) for w in words]
same_target = np.array([[a == t for t in target] for a in target])
off = ~np.eye(len(words), dtype=bool)
for name, fn, args in (("clip pooled (L_cond)", clip_pooled, (b["clip_tokens"], b["clip_mask"])),
                       ("llm mean emb (L_multi)", llm_mean, (b["caption_tokens"], b["caption_mask"]))):
  x = np.asarray(model.apply({"params": params}, *map(jnp.asarray, args), method=fn))
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos = x @ x.T
  xc = x - x.mean(0)
  var = np.linalg.svd(xc, compute_uv=False) ** 2
  print(f"{name}: cos all {cos[off].mean():.3f} +- {cos[off].std():.3f}; "
        f"same target words {cos[off & same_target].mean():.3f}, other {cos[off & ~same_target].mean():.3f}; "
        f"centred variance in top 4 directions {var[:4].sum() / var.sum():.2f}; "
        f"norm of mean / mean norm {np.linalg.norm(x.mean(0)):.3f}")
print("example captions:", words[:3])
