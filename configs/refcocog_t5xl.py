"""AlignCap on RefCOCOg (umd split) region captioning, BLIP-2 ViT-g + Flan-T5-XL.

Reproduces the reference recipe's second stage (DESIGN.md section 3): the
vg_t5xl model fine-tuned for 3 epochs on RefCOCOg with the same frozen towers,
trainable set and optimizer (AdamW lr 1e-4, weight decay 0.05, cosine; 32
regions per device x 8, as 64 does not fit 16 GiB), tags over sigmoid 0.7 at
inference. Same sizes as configs/vg_t5xl.py, so its memory figures hold here too.

Run (start from the exported VG model, or from the public weights alone):
  python -m aligncap_jax.main --config configs/refcocog_t5xl.py --workdir workdirs/refcocog \
      --mode prepare --config.data.manual_dir=/data/refcocog
  python -m aligncap_jax.main --config configs/refcocog_t5xl.py --workdir workdirs/refcocog \
      --mode train --config.init.hf=workdirs/vg_t5xl/export/hf
Variants: `:v5e_8`, `:v5e_256`, `:smoke`, as in configs/vg_t5xl.py.
"""
import importlib.util
import os


def _vg():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vg_t5xl.py")
  spec = importlib.util.spec_from_file_location("aligncap_configs_vg_t5xl", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  vg = _vg()
  c = vg.reference("refcocog_regions", tag_threshold=0.7)
  c.train.total_epochs = 3.0
  return vg.variant(c, arg, "configs/refcocog_t5xl.py")
