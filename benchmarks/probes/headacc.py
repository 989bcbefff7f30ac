"""A loss.context_head checkpoint on the test split: the direct head's and the
captioner's (teacher-forced) accuracy per caption position."""
import sys
import numpy as np
import jax, jax.numpy as jnp
from _checkpoint import load
from aligncap_jax.data import pipeline
from aligncap_jax.models import aligncap
c, assets, model, params = load(sys.argv[1:])
KEYS = ("views", "view_boxes", "caption_tokens", "caption_mask", "prompt_tokens", "prompt_mask")
f = jax.jit(lambda p, b: model.apply({"params": p}, b, method=aligncap.AlignCap.caption_logits))
def head(p, b):
  lat = model.apply({"params": p}, b, True, method=lambda m, bb, d: m._region_latents(bb, d))
  return model.apply({"params": p}, lat.mean(1), method=lambda m, z: m.context_head(z))
fh = jax.jit(head)
T = c.data.max_caption_tokens
hh = np.zeros(T); hc = np.zeros(T); tot = np.zeros(T)
for b in pipeline.make_eval_iterator(c, assets, "test", batch_size=50):
  bb = {k: jnp.asarray(b[k]) for k in KEYS}
  m = b["caption_mask"].astype(bool) & b["valid"].astype(bool)[:, None]
  pc = np.asarray(f(params, bb)).argmax(-1)
  ph = np.asarray(fh(params, bb)).reshape(len(pc), T, -1).argmax(-1)
  hc += ((pc == b["caption_tokens"]) & m).sum(0); hh += ((ph == b["caption_tokens"]) & m).sum(0)
  tot += m.sum(0)
print("head     ", np.round(hh / np.maximum(tot, 1), 3)[:10])
print("captioner", np.round(hc / np.maximum(tot, 1), 3)[:10])
