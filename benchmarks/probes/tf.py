"""Teacher-forced per-position accuracy on the test split vs the generated captions."""
import os, sys, numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs")); sys.path.insert(0, ROOT)
DIR = os.environ.get("PROBE_DIR", os.path.join(ROOT, "workdirs", "context_probe"))
import jax, jax.numpy as jnp
import synthetic as cfgmod
from aligncap_jax import evaluate as eval_lib
from aligncap_jax.data import pipeline
from aligncap_jax.models import aligncap
wd = sys.argv[1]
c = cfgmod.get_config(); c.model.view_box_embedding = True
for s in sys.argv[2:]:
  k, v = s.split("="); sec, f = k.split("."); c[sec][f] = type(c[sec][f])(eval(v))
mesh, assets, model, params, _ = eval_lib.load_for_inference(c, wd, "eval")
f = jax.jit(lambda p, b: model.apply({"params": p}, b, method=aligncap.AlignCap.caption_logits))
hits = np.zeros(16); tot = np.zeros(16)
for b in pipeline.make_eval_iterator(c, assets, "test", batch_size=50):
  ok = b["valid"].astype(bool)
  lg = np.asarray(f(params, {k: jnp.asarray(v) for k, v in b.items() if k not in ("region_id", "image_id")}))
  pred = lg.argmax(-1); m = b["caption_mask"].astype(bool) & ok[:, None]
  hits += ((pred == b["caption_tokens"]) & m).sum(0); tot += m.sum(0)
print("teacher-forced accuracy per caption position:", np.round(hits / np.maximum(tot, 1), 3)[:12])
ex = b["caption_tokens"][0]; print("example:", [assets.llm_tokenizer.id_to_token(int(t)) for t in ex[:12]])
