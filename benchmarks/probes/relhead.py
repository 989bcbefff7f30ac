"""Does the captioner's gradient teach the front end the relation? Full AlignCap,
trained on the real train iterator with L_cap restricted to caption positions
(`--positions 4`: the relation token; `all`), only L_cap (`--total 0`) or every
default loss (`--total 1`), with (`--head 1`) or without (`--head 0`) a linear
softmax head on the mean latent that predicts the relation token directly.
Prints the head's test accuracy and the captioner's teacher-forced accuracy per
caption position on the test split every 200 steps."""
import sys, time, argparse, numpy as np
ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
sys.path.insert(0, ROOT + "/configs"); sys.path.insert(0, ROOT)
import jax, jax.numpy as jnp, optax
import synthetic as cfgmod
from aligncap_jax.data import pipeline
from aligncap_jax.models import aligncap
p = argparse.ArgumentParser()
p.add_argument("--positions", default="4"); p.add_argument("--steps", type=int, default=600)
p.add_argument("--set", action="append", default=[]); p.add_argument("--bs", type=int, default=64)
p.add_argument("--head", type=int, default=1); p.add_argument("--total", type=int, default=0)
p.add_argument("--head_positions", default="4", help="4: the head predicts the relation token; "
               "all: one linear map per caption position, every token (summed)")
a = p.parse_args()
c = cfgmod.get_config()
if not a.total: c.loss.gamma = 0.0; c.loss.lambda_ = 0.0; c.loss.alpha = 0.0
for s in a.set:
  k, v = s.split("="); sec, f = k.split("."); c[sec][f] = type(c[sec][f])(eval(v))
assets = pipeline.load_assets(c)
V = len(assets.tag_vocab)
model = aligncap.build_model(c, V)
params = model.init(jax.random.PRNGKey(0), aligncap.dummy_batch(c, 2, V), jnp.zeros((V, 64)))["params"]
import flax
params = flax.core.meta.unbox(params)
tagemb = jnp.zeros((V, 64))
import flax.linen as nn
T = c.data.max_caption_tokens
head = nn.Dense(128 if a.head_positions == "4" else 128 * T)
hparams = head.init(jax.random.PRNGKey(2), jnp.zeros((1, 64)))
def head_logits(hp, z):
  out = head.apply(hp, z)
  return out if a.head_positions == "4" else out.reshape(z.shape[0], T, 128)
params = {"m": params, "h": hparams}
pos = [int(x) for x in a.positions.split(",")] if a.positions != "all" else None
def restrict(b):
  b = dict(b)
  if pos is not None:
    m = np.zeros_like(b["caption_mask"]); m[:, pos] = b["caption_mask"][:, pos]; b["caption_mask"] = m
  return b
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 50, a.steps), weight_decay=0.05)
opt = tx.init(params)
KEYS = ("views", "view_boxes", "caption_tokens", "caption_mask", "clip_tokens", "clip_mask", "tag_labels", "prompt_tokens", "prompt_mask", "valid")
@jax.jit
def step(pr, o, b, rng):
  def lf(pp):
    tot, met = model.apply({"params": pp["m"]}, b, tagemb, train=True, rngs={"dropout": rng})
    lc = tot if a.total else met["loss_cap"]
    lat = model.apply({"params": pp["m"]}, b, True, method=lambda m, bb, d: m._region_latents(bb, d))
    lg = head_logits(pp["h"], lat.mean(1))
    if a.head_positions == "4":
      hl = optax.softmax_cross_entropy_with_integer_labels(lg, b["caption_tokens"][:, 4]).mean()
    else:
      ce = optax.softmax_cross_entropy_with_integer_labels(lg, b["caption_tokens"])
      hl = (ce * b["caption_mask"]).sum(1).mean()
    return lc + a.head * hl, (lc, hl)
  (l, aux), g = jax.value_and_grad(lf, has_aux=True)(pr)
  u, o = tx.update(g, o, pr); return optax.apply_updates(pr, u), o, aux
f = jax.jit(lambda pr, b: model.apply({"params": pr["m"]}, b, method=aligncap.AlignCap.caption_logits))
fh = jax.jit(lambda pr, b: head_logits(pr["h"], model.apply({"params": pr["m"]}, b, True, method=lambda m, bb, d: m._region_latents(bb, d)).mean(1)))
it = pipeline.make_train_iterator(c, assets, global_batch_size=a.bs)
def evaluate():
  hits = np.zeros(16); tot = np.zeros(16)
  for b in pipeline.make_eval_iterator(c, assets, "test", batch_size=50):
    ok = b["valid"].astype(bool)
    lg = np.asarray(f(params, {k: jnp.asarray(b[k]) for k in KEYS}))
    pred = lg.argmax(-1); m = b["caption_mask"].astype(bool) & ok[:, None]
    hits += ((pred == b["caption_tokens"]) & m).sum(0); tot += m.sum(0)
    hp = np.asarray(fh(params, {k: jnp.asarray(b[k]) for k in KEYS})).argmax(-1)
    if hp.ndim == 2: hp = hp[:, 4]
    hits[15] += ((hp == b["caption_tokens"][:, 4]) & ok).sum(); tot[15] += ok.sum()
  print("head acc", hits[15] / tot[15])
  return np.round(hits / np.maximum(tot, 1), 3)[:9]
t0 = time.time(); rng = jax.random.PRNGKey(1)
for s in range(a.steps):
  b = restrict(next(it))
  params, opt, l = step(params, opt, {k: jnp.asarray(b[k]) for k in KEYS}, jax.random.fold_in(rng, s))
  if (s + 1) % 200 == 0:
    print(f"step {s+1} loss {float(l[0]):.3f} head {float(l[1]):.3f} {time.time()-t0:.0f}s test tf-acc per position {evaluate()}", flush=True)
