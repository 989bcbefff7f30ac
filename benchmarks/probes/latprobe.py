"""Linear probe of a trained checkpoint's Q-Former latents for the context labels."""
import os, sys, numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs")); sys.path.insert(0, ROOT)
DIR = os.environ.get("PROBE_DIR", os.path.join(ROOT, "workdirs", "context_probe"))
import jax, jax.numpy as jnp, optax
import synthetic as cfgmod
from aligncap_jax import evaluate as eval_lib
from flax import linen as nn
wd = sys.argv[1]
c = cfgmod.get_config(); c.model.view_box_embedding = True
for s_ in sys.argv[2:]:   # section.field=value overrides
  k, v = s_.split("="); sec, f = k.split("."); c[sec][f] = type(c[sec][f])(eval(v))
mesh, assets, model, params, _ = eval_lib.load_for_inference(c, wd, "eval")
tr, te = dict(np.load(os.path.join(DIR, "train.npz"))), dict(np.load(os.path.join(DIR, "test.npz")))
@jax.jit
def lat(p, v, b):
  x = model.apply({"params": p}, {"views": v, "view_boxes": b}, method=lambda m, bb: m._region_latents(bb, True))
  return x.reshape(x.shape[0], -1)
def feats(d, n):
  return np.concatenate([np.asarray(lat(params, d["views"][i:i+100], d["view_boxes"][i:i+100])) for i in range(0, n, 100)])
Xtr, Xte = feats(tr, 6000), feats(te, len(te["labels"]))
mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
ytr, yte = tr["labels"][:6000], te["labels"]
for k, name, n in ((0, "relation", 4), (1, "n_colour", 6), (2, "n_shape", 4), (3, "t_colour", 6), (4, "t_shape", 4)):
  W = jnp.zeros((Xtr.shape[1], n)); bb = jnp.zeros(n); tx = optax.adam(1e-2); st = tx.init((W, bb))
  def loss(wb): return optax.softmax_cross_entropy_with_integer_labels(Xtr @ wb[0] + wb[1], ytr[:, k]).mean() + 1e-3 * jnp.sum(wb[0] ** 2)
  g = jax.jit(jax.value_and_grad(loss))
  wb = (W, bb)
  for i in range(300):
    l, gr = g(wb); u, st = tx.update(gr, st); wb = optax.apply_updates(wb, u)
  acc = lambda X, y: float(((X @ wb[0] + wb[1]).argmax(-1) == y).mean())
  print(f"{name}: train {acc(Xtr, ytr[:, k]):.3f} test {acc(Xte, yte[:, k]):.3f}", flush=True)
