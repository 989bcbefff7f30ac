"""Gradient of each loss into the view paths: fusion fc1 rows per view, cross-view block."""
import sys, numpy as np
ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
sys.path.insert(0, ROOT + "/configs"); sys.path.insert(0, ROOT)
import jax, jax.numpy as jnp
import synthetic as cfgmod
from aligncap_jax import evaluate as eval_lib
from aligncap_jax.data import pipeline
from aligncap_jax.models import aligncap
wd = sys.argv[1]
c = cfgmod.get_config()
mesh, assets, model, params, _ = eval_lib.load_for_inference(c, wd, "eval")
enc = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=aligncap.AlignCap.encode_tags))
tagemb = enc(params, assets.tag_clip_tokens, assets.tag_clip_mask)
it = pipeline.make_train_iterator(c, assets, global_batch_size=64)
b = next(it); b = {k: jnp.asarray(v) for k, v in b.items()}
names = ["loss_cap", "loss_tag", "loss_cond", "loss_multi"]
def lossk(p, k):
  _, met = model.apply({"params": p}, b, tagemb, train=False)
  return met[k]
C = 64
fc1 = params["view_fusion"]["fc1"]["kernel"]
fc1 = getattr(fc1, "value", fc1)
w = np.asarray(fc1)
print("fc1 weight norm per view:", [round(float(np.linalg.norm(w[i*C:(i+1)*C])), 3) for i in range(3)])
for k in names:
  g = jax.grad(lossk)(params, k)
  g1 = g["view_fusion"]["fc1"]["kernel"]; g1 = np.asarray(getattr(g1, "value", g1))
  cv = jax.tree.leaves(g["cross_view"]); cvn = float(np.sqrt(sum(float(jnp.sum(x**2)) for x in cv)))
  vn = float(np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g["vision"]))))
  qn = float(np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g["qformer"]))))
  print(f"{k}: fc1 grad per view {[round(float(np.linalg.norm(g1[i*C:(i+1)*C])), 5) for i in range(3)]} cross_view {cvn:.5f} vision {vn:.5f} qformer {qn:.5f}", flush=True)
