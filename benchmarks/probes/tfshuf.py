"""Teacher-forced accuracy per caption position: real views vs views of another region; with the batch prompt vs the no-tag prompt."""
import sys
import numpy as np
import jax, jax.numpy as jnp
from _checkpoint import load
from aligncap_jax.data import pipeline
from aligncap_jax.models import aligncap
c, assets, model, params = load(sys.argv[1:])
f = jax.jit(lambda p, b: model.apply({"params": p}, b, method=aligncap.AlignCap.caption_logits))
it = pipeline.make_train_iterator(c, assets, global_batch_size=64)
batches = [next(it) for _ in range(8)]
tok = assets.llm_tokenizer
b0 = batches[0]
print("prompt example:", [tok.id_to_token(int(t)) for t, m in zip(b0["prompt_tokens"][0], b0["prompt_mask"][0]) if m])
print("caption example:", [tok.id_to_token(int(t)) for t in b0["caption_tokens"][0][:12]])
for name in ("real", "shuffled_views", "real_noprompt", "shuffled_noprompt"):
  hits = np.zeros(16); tot = np.zeros(16)
  for b in batches:
    b = dict(b)
    # keep only rows whose prompt was not dropped for the prompt variants
    if "shuffled" in name:
      perm = np.roll(np.arange(len(b["views"])), 7)
      b["views"] = b["views"][perm]; b["view_boxes"] = b["view_boxes"][perm]
    if "noprompt" in name:
      pt = np.zeros_like(b["prompt_tokens"]); pm = np.zeros_like(b["prompt_mask"])
      bar = tok.token_to_id("|"); pt[:, 0] = bar; pt[:, 1] = assets.eos_id; pm[:, :2] = 1
      b["prompt_tokens"], b["prompt_mask"] = pt, pm
    ok = b["valid"].astype(bool)
    lg = np.asarray(f(params, {k: jnp.asarray(v) for k, v in b.items() if k not in ("region_id", "image_id")}))
    pred = lg.argmax(-1); m = b["caption_mask"].astype(bool) & ok[:, None]
    hits += ((pred == b["caption_tokens"]) & m).sum(0); tot += m.sum(0)
  print(f"{name:18s}", np.round(hits / np.maximum(tot, 1), 3)[:11], flush=True)
