"""Relation / neighbour probes: train a head on the AlignCap front end (or box geometry)."""
import os, sys, time, argparse, numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs")); sys.path.insert(0, ROOT)
DIR = os.environ.get("PROBE_DIR", os.path.join(ROOT, "workdirs", "context_probe"))
import jax, jax.numpy as jnp, flax.linen as nn, optax
import synthetic as cfgmod
from aligncap_jax.models import aligncap
p = argparse.ArgumentParser()
p.add_argument("--mode", default="model"); p.add_argument("--steps", type=int, default=600)
p.add_argument("--set", action="append", default=[]); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--pool", default="mean"); p.add_argument("--views", default="all")
a = p.parse_args()
tr, te = dict(np.load(os.path.join(DIR, "train.npz"))), dict(np.load(os.path.join(DIR, "test.npz")))
c = cfgmod.get_config()
for s in a.set:
  k, v = s.split("="); obj = c
  *path, last = k.split(".")
  for q in path: obj = obj[q]
  obj[last] = type(obj[last])(eval(v)) if not isinstance(obj[last], str) else v
cf = c.lock() if hasattr(c, "lock") else c
import ml_collections
fc = ml_collections.FrozenConfigDict(c)
class Probe(nn.Module):
  @nn.compact
  def __call__(self, views, boxes):
    if a.mode == "boxes":
      x = boxes.reshape(boxes.shape[0], -1) / 64.0
      x = nn.relu(nn.Dense(128)(x)); x = nn.relu(nn.Dense(128)(x))
    else:
      ac = aligncap.AlignCap(fc, 8)
      lat = ac._region_latents({"views": views, "view_boxes": boxes}, True)
      x = lat.mean(1) if a.pool == "mean" else lat.reshape(lat.shape[0], -1)
    return nn.Dense(4)(x), nn.Dense(6)(x), nn.Dense(4)(x)
m = Probe()
def sel(v, b):
  if a.views == "target":   # candidate views replaced by the target box
    v = np.repeat(v[:, :1], v.shape[1], 1); b = np.repeat(b[:, :1], b.shape[1], 1)
  return v, b
params = m.init(jax.random.PRNGKey(0), *sel(tr["views"][:2], tr["view_boxes"][:2]))
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, 50, a.steps), weight_decay=0.05)
opt = tx.init(params)
def loss_fn(pr, v, b, y):
  r, nc, ns = m.apply(pr, v, b)
  ce = optax.softmax_cross_entropy_with_integer_labels
  return (ce(r, y[:, 0]) + ce(nc, y[:, 1]) + ce(ns, y[:, 2])).mean()
@jax.jit
def step(pr, o, v, b, y):
  l, g = jax.value_and_grad(loss_fn)(pr, v, b, y)
  u, o = tx.update(g, o, pr); return optax.apply_updates(pr, u), o, l
@jax.jit
def pred(pr, v, b):
  return [z.argmax(-1) for z in m.apply(pr, v, b)]
def evaluate(d):
  out = [[], [], []]
  for i in range(0, len(d["labels"]), 100):
    v, b = sel(d["views"][i:i+100], d["view_boxes"][i:i+100])
    for k, z in enumerate(pred(params, v, b)): out[k].append(np.asarray(z))
  y = d["labels"]; o = [np.concatenate(z) for z in out]
  return "rel %.3f ncol %.3f nshp %.3f nb %.3f" % ((o[0] == y[:, 0]).mean(), (o[1] == y[:, 1]).mean(), (o[2] == y[:, 2]).mean(), ((o[1] == y[:, 1]) & (o[2] == y[:, 2])).mean())
n = len(tr["labels"]); rs = np.random.RandomState(0); t0 = time.time()
for s in range(a.steps):
  idx = rs.randint(0, n, 64)
  v, b = sel(tr["views"][idx], tr["view_boxes"][idx])
  params, opt, l = step(params, opt, v, b, tr["labels"][idx])
  if s == 9: print("10 steps", time.time()-t0, flush=True)
  if (s + 1) % 200 == 0 or s + 1 == a.steps:
    print(f"step {s+1} loss {float(l):.3f} {time.time()-t0:.0f}s test: {evaluate(te)}  train1k: {evaluate({k: tr[k][:300] for k in tr})}", flush=True)
