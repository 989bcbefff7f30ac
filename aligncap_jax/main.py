"""Entry point: parse flags, check the config, log devices, dispatch `--mode`.

  python -m aligncap_jax.main --config configs/synthetic.py --workdir DIR \
      --mode train|eval|predict|serve|prepare|god|describe|aot|export [--config.x=y ...]

Configuration, workdir and input problems end in one line on stderr and exit
code 2 (run with `--verbosity=1` to also log the traceback); a run stopped by
SIGTERM after saving exits with 143, a training or checkpoint failure with 1.
"""
from __future__ import annotations

import os
import sys
import traceback

from aligncap_jax import fake_devices

# Before jax starts: thread slack for fake CPU devices (XLA_FLAGS' device count,
# e.g. `--mode aot --aot_topology cpu:8`), else their collectives can deadlock.
fake_devices.ensure_thread_slack()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "eval", "predict", "serve", "prepare", "god", "describe", "aot", "export")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:arg]); override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, eval.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_IMAGE = flags.DEFINE_string("image", None, "predict: image file.")
_BOX = flags.DEFINE_multi_string("box", [], "predict: x1,y1,x2,y2 in pixels (repeatable).")
_DETECTIONS = flags.DEFINE_string("detections", None,
                                  "predict: COCO-results json of detections for context views.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on.")
_PORT = flags.DEFINE_integer("port", 8080, "serve: TCP port (0: any free port, printed).")
_AOT_TOPOLOGY = flags.DEFINE_string("aot_topology", "cpu:8", "aot: device topology.")
_PUSH_TO_HUB = flags.DEFINE_string("push_to_hub", None, "export: Hugging Face repo id.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: host:port of process 0 (or set ALIGNCAP_DISTRIBUTED=1 to let JAX "
    "discover the cluster on Cloud TPU / SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

_NEEDS_WORKDIR = ("train", "eval", "predict", "serve", "export")
COMPILATION_CACHE_DIR = "compilation_cache"  # inside the workdir


def _fail(message: str, code: int) -> None:
  logging.debug("%s", traceback.format_exc())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _dispatch(config, workdir: str | None, mode: str) -> None:
  """Runs one mode; each lives in its own module."""
  if mode == "train":
    from aligncap_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == "eval":
    from aligncap_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)
  elif mode == "predict":
    from aligncap_jax import predict  # pylint: disable=g-import-not-at-top
    if not _IMAGE.value:
      raise ValueError("--mode predict needs --image PATH and at least one --box x1,y1,x2,y2")
    boxes = [predict.parse_box(b) for b in _BOX.value]
    predict.predict(config, workdir, _IMAGE.value, boxes, _DETECTIONS.value)
  elif mode == "serve":
    from aligncap_jax import serve  # pylint: disable=g-import-not-at-top
    serve.serve(config, workdir, host=_HOST.value, port=_PORT.value)
  elif mode in ("prepare", "god"):
    from aligncap_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.prepare(config, build_real=True)
  elif mode == "describe":
    from aligncap_jax import describe  # pylint: disable=g-import-not-at-top
    describe.describe(config)
  elif mode == "aot":
    from aligncap_jax import aot  # pylint: disable=g-import-not-at-top
    aot.run(config, _AOT_TOPOLOGY.value)
  elif mode == "export":
    from aligncap_jax import hf_export  # pylint: disable=g-import-not-at-top
    hf_export.export(config, workdir, push_to_hub=_PUSH_TO_HUB.value)


def _enable_compilation_cache(jax, config, workdir: str | None, mode: str) -> str | None:
  """Points JAX's persistent compilation cache at <workdir>/compilation_cache.

  Config `train.compilation_cache`, for the modes that compile in a workdir. A
  cache folder the user already chose (`JAX_COMPILATION_CACHE_DIR`, e.g. one
  shared by many runs, as `launch/test.sh` does for the suite) is kept.
  Every compile is cached (JAX's default skips those under 1 s, i.e. most CPU
  compiles). A workdir that eval/predict/serve/export would reject as missing
  is not created here.

  Returns:
    The cache folder, or None when off.
  """
  if (not config.train.compilation_cache or mode not in _NEEDS_WORKDIR or not workdir
      or (mode != "train" and "://" not in workdir and not os.path.isdir(workdir))):
    return None
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      workdir, COMPILATION_CACHE_DIR)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""
  return record.levelno > 20 or "/orbax/" not in record.pathname


def _checked_config():
  """The parsed config, validated; ValueError/FileNotFoundError otherwise."""
  from aligncap_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  flag = flags.FLAGS["config"]
  filename = flag.present and config_flags.get_config_filename(flag)
  if not filename:
    raise ValueError("--config is required (e.g. --config configs/synthetic.py)")
  if not os.path.isfile(filename.split(":", 1)[0]):
    raise FileNotFoundError(f"--config {filename}: file not found")
  config = _CONFIG.value
  config_lib.validate(config)
  return config


# Config fields that name local files or folders; a relative value is taken from the
# directory the command ran in. (orbax refuses relative checkpoint paths, and later
# code may change directory or hand paths to worker processes.)
_PATH_FIELDS = ("data.data_dir", "data.manual_dir", "data.detections_file",
                "data.tag_list_file", "data.llm_tokenizer", "data.clip_tokenizer",
                "init.blip2", "init.clip_text", "init.llm", "init.hf")
# Of those, fields that may also hold a Hugging Face hub id ("t5-small"): made
# absolute only when the relative path exists.
_MAYBE_HUB_ID = ("data.llm_tokenizer", "data.clip_tokenizer")


def absolute_path(path: str | None) -> str | None:
  """`path` made absolute from the working directory; URLs (gs://...) unchanged."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_paths(config) -> None:
  """Makes the config's local path fields absolute, in place."""
  for dotted in _PATH_FIELDS:
    parent, _, name = dotted.rpartition(".")
    node = config
    for part in parent.split("."):
      node = node[part]
    value = node[name]
    if not value or "://" in value:
      continue
    if dotted in _MAYBE_HUB_ID and not os.path.exists(os.path.expanduser(value)):
      continue
    node[name] = absolute_path(value)


def main(argv):
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
  mode, workdir = _MODE.value, absolute_path(_WORKDIR.value)
  try:
    config = _checked_config()
    resolve_paths(config)
    if mode in _NEEDS_WORKDIR and not workdir:
      raise ValueError(f"--mode {mode} needs --workdir DIR")
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e), 2)
  # Heavy imports only once the command line is known to be sound.
  import jax  # pylint: disable=g-import-not-at-top
  from aligncap_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from aligncap_jax import sharding  # pylint: disable=g-import-not-at-top
  from aligncap_jax import train  # pylint: disable=g-import-not-at-top
  cache = _enable_compilation_cache(jax, config, workdir, mode)
  compiler = sharding.apply_compiler_settings(config)
  try:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    logging.info("JAX %s on %s: process %d of %d, %d local / %d global devices: %s",
                 jax.__version__, jax.default_backend(), jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices())
    logging.info("compilation cache: %s", cache or "off")
    if compiler:
      logging.info("compiler settings: %s", "; ".join(compiler))
    _dispatch(config, workdir, mode)
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e), 2)
  except (checkpoint.CheckpointError, train.TrainingError) as e:
    _fail(str(e), 1)
  except train.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(143)


def _unknown_override(argv) -> str | None:
  """A one-line message for the first `--config.x` that names no config field."""
  import difflib  # pylint: disable=g-import-not-at-top
  from aligncap_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  known = set(config_lib._all_paths(config_lib.base_config()))  # pylint: disable=protected-access
  for arg in argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      if path not in known:
        close = difflib.get_close_matches(path, sorted(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config field '{path}' in {arg}{hint}"
  return None


def _parse_flags(argv):
  """absl flag parsing with one-line errors (unknown --config.x, bad config file)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_unknown_override(argv) or e}", file=sys.stderr)
    sys.exit(2)
  except (ValueError, OSError, AttributeError, KeyError) as e:
    message = _unknown_override(argv) or f"--config: {str(e).splitlines()[0]}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
