"""Shared by the checkpoint probes: `load(argv)` -> (config, assets, model, params)
for `SCRIPT WORKDIR [section.field=value ...]` on configs/synthetic.py."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, ROOT)


def load(argv, **defaults):
  """argv[0] is the workdir; argv[1:] are `section.field=value` overrides applied
  after `defaults` ({"section.field": value})."""
  import synthetic as cfgmod  # pylint: disable=g-import-not-at-top
  from aligncap_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  c = cfgmod.get_config()
  items = list(defaults.items()) + [tuple(s.split("=", 1)) for s in argv[1:]]
  for key, value in items:
    sec, field = key.split(".")
    c[sec][field] = value if not isinstance(value, str) else type(c[sec][field])(eval(value))
  _, assets, model, params, _ = eval_lib.load_for_inference(c, argv[0], "eval")
  return c, assets, model, params
