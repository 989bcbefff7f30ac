"""Dump (views, view_boxes, relation/neighbour labels) from the real pipeline."""
import os, sys, numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs")); sys.path.insert(0, ROOT)
DIR = os.environ.get("PROBE_DIR", os.path.join(ROOT, "workdirs", "context_probe"))
import synthetic as cfgmod
from aligncap_jax.data import pipeline, synthetic
from aligncap_jax.metrics import attributes
c = cfgmod.get_config()
# Overrides as `section.field=value` arguments after N (e.g. data.view_size=96).
for arg in sys.argv[2:]:
  key, value = arg.split("=", 1)
  *path, last = key.split(".")
  node = c
  for q in path:
    node = node[q]
  node[last] = type(node[last])(eval(value)) if not isinstance(node[last], str) else value
os.makedirs(DIR, exist_ok=True)
assets = pipeline.load_assets(c)
REL = {r: i for i, r in enumerate(synthetic.RELATIONS)}
COL = {r: i for i, r in enumerate(synthetic.COLOURS)}
SHP = {r: i for i, r in enumerate(synthetic.SHAPES)}
def labels(tokens, mask):
  out = []
  for t, m in zip(tokens, mask):
    ids = [int(x) for x, k in zip(t, m) if k and x not in (assets.eos_id, assets.pad_id)]
    p = attributes.parse_caption(assets.llm_tokenizer.decode(ids))
    out.append([REL[p["relation"]], COL[p["n_colour"]], SHP[p["n_shape"]], COL[p["colour"]], SHP[p["shape"]]])
  return np.asarray(out, np.int32)
def collect(it, n, key):
  V, B, L, val = [], [], [], []
  for k in range(n):
    b = next(it)
    V.append(b["views"]); B.append(b["view_boxes"]); val.append(b["valid"])
    L.append(labels(b["caption_tokens"], b["caption_mask"]) if True else None)
  v = np.concatenate(val).astype(bool)
  np.savez(os.path.join(DIR, f"{key}.npz"), views=np.concatenate(V)[v], view_boxes=np.concatenate(B)[v], labels=np.concatenate(L)[v])
  print(key, v.sum())
it = pipeline.make_eval_iterator(c, assets, "test", batch_size=50)
V, B, L, val = [], [], [], []
for b in it:
  val.append(b["valid"]); V.append(b["views"]); B.append(b["view_boxes"])
  ok = b["valid"].astype(bool)
  lab = np.zeros((len(ok), 5), np.int32); lab[ok] = labels(b["caption_tokens"][ok], b["caption_mask"][ok]); L.append(lab)
v = np.concatenate(val).astype(bool)
np.savez(os.path.join(DIR, "test.npz"), views=np.concatenate(V)[v], view_boxes=np.concatenate(B)[v], labels=np.concatenate(L)[v])
print("test", v.sum())
it = pipeline.make_train_iterator(c, assets, global_batch_size=64)
collect(it, int(sys.argv[1]), "train")
