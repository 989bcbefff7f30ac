"""`--mode export` and its inverse: a trained AlignCap as a Hugging Face style folder.

`WORKDIR/export/hf/` holds:
- `model.safetensors` (or 5 GB shards + `model.safetensors.index.json`): every
  parameter under its dotted Flax path, in its training dtype;
- `config.json`: the full AlignCap config (`aligncap_config`), `num_tags`,
  `architectures: ["AlignCap"]`, `model_type: "aligncap"`, the checkpoint step;
- `tokenizer.json` (+ the LLM tokenizer folder's companion files) and
  `clip_tokenizer/` (the CLIP text tokenizer), from the files the assets came from;
- `tag_vocab.txt`: the tag vocabulary, one tag per line, in model order;
- `README.md`: the model card (architecture, data, metrics of the last eval,
  intended use, limitations).

`load(path)` reads it back into (config, params, assets); the trainer starts
from it with `--config.init.hf=PATH` through `load_params`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from aligncap_jax import config as config_lib
from aligncap_jax.hf_export import model_card
from aligncap_jax.hf_export import safetensors_io

CONFIG_FILE = "config.json"
TAG_VOCAB_FILE = "tag_vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
CLIP_TOKENIZER_DIR = "clip_tokenizer"
# Files a Hugging Face tokenizer folder may carry besides tokenizer.json.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                        "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt")
FORMAT_VERSION = 1


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, "export", "hf")


def _write_tokenizer(tok, source: str | None, directory: str) -> None:
  """Saves `tok` as tokenizer.json and copies the source folder's companion files."""
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, TOKENIZER_FILE))
  if source and os.path.isdir(source):
    for name in TOKENIZER_COMPANIONS:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copy2(os.path.join(source, name), os.path.join(directory, name))


def write_folder(config: ml_collections.ConfigDict, params: Any, assets: Any, directory: str,
                 *, step: int | None = None, metrics: dict | None = None,
                 max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES) -> str:
  """Writes the export folder for in-memory params and assets.

  Args:
    config: the config the model was trained with.
    params: the model's parameter tree (jax or numpy arrays, unboxed).
    assets: `pipeline.Assets` (tokenizers and tag vocabulary).
    directory: output folder (created; existing export files are replaced).
    step: the checkpoint step, recorded in config.json and the card.
    metrics: eval metrics for the card (e.g. `WORKDIR/eval/metrics.json`).
    max_shard_bytes: split the weights above this size.

  Returns:
    `directory`.
  """
  from aligncap_jax.data import tags as tags_lib
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if name.startswith("model") and name.endswith((".safetensors", ".index.json")):
      os.remove(os.path.join(directory, name))
  files = safetensors_io.save_params(params, directory, max_shard_bytes)
  num_tags = len(assets.tag_vocab)
  doc = {"architectures": ["AlignCap"], "model_type": "aligncap",
         "format_version": FORMAT_VERSION, "num_tags": num_tags, "step": step,
         "aligncap_config": config.to_dict()}
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True, default=_json_default)
  tags_lib.save_vocab(assets.tag_vocab, os.path.join(directory, TAG_VOCAB_FILE))
  _write_tokenizer(assets.llm_tokenizer, config.data.llm_tokenizer, directory)
  _write_tokenizer(assets.clip_tokenizer, config.data.clip_tokenizer,
                   os.path.join(directory, CLIP_TOKENIZER_DIR))
  counts = _counts(config, params)
  card = model_card.render(config, num_tags=num_tags, step=step, metrics=metrics,
                           weight_files=files, **counts)
  with open(os.path.join(directory, "README.md"), "w") as f:
    f.write(card)
  return directory


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"config value {x!r} of type {type(x).__name__} is not JSON-serialisable")


def _counts(config, params) -> dict[str, int]:
  from aligncap_jax import train_state
  mask = train_state.trainable_mask(config, params)
  trainable, frozen = train_state.count_params(params, mask)
  return {"total_params": trainable + frozen, "trainable_params": trainable}


def _read_metrics(workdir: str) -> dict | None:
  path = os.path.join(workdir, "eval", "metrics.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"eval metrics file {path} is not valid JSON: {e}") from e


def export(config: ml_collections.ConfigDict, workdir: str,
           push_to_hub: str | None = None) -> str:
  """`--mode export`: the latest checkpoint of `workdir` -> `WORKDIR/export/hf/`.

  Args:
    config: the training config (the one `--mode train` used).
    workdir: the training workdir (needs a checkpoint).
    push_to_hub: a Hub repo id ("user/name") to upload the folder to.

  Returns:
    The export folder.
  """
  from aligncap_jax import checkpoint
  from aligncap_jax import sharding
  from aligncap_jax import train_state
  from aligncap_jax.data import pipeline
  from aligncap_jax.models import aligncap
  step = checkpoint.latest_step_or_fail(workdir, "export")
  assets = pipeline.load_assets(config)
  model = aligncap.build_model(config, len(assets.tag_vocab))
  mesh = sharding.make_mesh(config)
  factory = train_state.StateFactory(config, model, mesh, len(assets.tag_vocab), steps=1)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    state = ckpt.restore(step, factory.abstract_state)
  finally:
    ckpt.close()
  out = export_dir(workdir)
  if jax.process_index() == 0:
    write_folder(config, state.params, assets, out, step=step, metrics=_read_metrics(workdir))
    print(f"exported step {step} to {out}")
    if push_to_hub:
      push(out, push_to_hub)
  return out


def push(directory: str, repo_id: str) -> str:
  """Uploads an export folder to the Hugging Face Hub (needs network and a token).

  Returns:
    The repo URL.
  """
  try:
    import huggingface_hub
  except ImportError as e:
    raise ImportError("--push_to_hub needs the huggingface_hub package: "
                      "pip install '.[hub]' (or pip install huggingface-hub)") from e
  api = huggingface_hub.HfApi()
  url = api.create_repo(repo_id, exist_ok=True)
  api.upload_folder(folder_path=directory, repo_id=repo_id,
                    commit_message="Upload AlignCap export")
  print(f"uploaded {directory} to {url}")
  return str(url)


def read_config(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The AlignCap config stored in an export folder, and the raw config.json.

  Tokenizer and tag-vocabulary fields point into the folder; `init.hf` is the
  folder itself and the public-weight paths are cleared.

  Raises:
    FileNotFoundError / ValueError: naming the folder, file or field.
  """
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} is not an AlignCap export: no {CONFIG_FILE}")
  with open(file) as f:
    doc = json.load(f)
  if "AlignCap" not in doc.get("architectures", []) or "aligncap_config" not in doc:
    raise ValueError(f"{file}: not an AlignCap export (architectures="
                     f"{doc.get('architectures')!r}, needs 'aligncap_config')")
  config = config_lib.base_config()
  _assign(config, doc["aligncap_config"], "", file)
  config.init.blip2 = None
  config.init.clip_text = None
  config.init.llm = None
  config.init.hf = path
  config.data.llm_tokenizer = os.path.join(path, TOKENIZER_FILE)
  config.data.clip_tokenizer = os.path.join(path, CLIP_TOKENIZER_DIR, TOKENIZER_FILE)
  config.data.tag_list_file = os.path.join(path, TAG_VOCAB_FILE)
  config_lib.validate(config)
  return config, doc


def _assign(config: ml_collections.ConfigDict, values: dict, prefix: str, file: str) -> None:
  for key, value in values.items():
    name = f"{prefix}{key}"
    if key not in config:
      raise ValueError(f"{file}: unknown config field '{name}' (exported by a newer version?)")
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ValueError(f"{file}: config field '{name}' must be an object, got {value!r}")
      _assign(config[key], value, name + ".", file)
    else:
      config[key] = value


def load_assets(path: str, config: ml_collections.ConfigDict) -> Any:
  """The tokenizers and tag tables of an export folder (a `pipeline.Assets`)."""
  from aligncap_jax.data import pipeline
  from aligncap_jax.data import tags as tags_lib
  from aligncap_jax.data import tokenizer
  return pipeline.make_assets(
      tokenizer.load(config.data.llm_tokenizer), tokenizer.load(config.data.clip_tokenizer),
      tags_lib.load_vocab(os.path.join(path, TAG_VOCAB_FILE)),
      eos_id=config.model.llm.eos_token_id, pad_id=config.model.llm.pad_token_id,
      clip_max_tokens=config.data.clip_max_tokens,
      max_prompt_tokens=config.data.max_prompt_tokens)


def abstract_params(config: ml_collections.ConfigDict, num_tags: int) -> Any:
  """The model's parameter shapes for `config` (no weights)."""
  import flax.linen as nn

  from aligncap_jax import describe
  from aligncap_jax.models import aligncap
  model = aligncap.build_model(config, num_tags)
  return nn.meta.unbox(describe.abstract_variables(config, model, num_tags)["params"])


def load_params(path: str, abstract: Any, shardings: Any | None = None) -> Any:
  """The export's weights checked against (and cast to) `abstract`'s names, shapes, dtypes.

  This is what the trainer calls for `--config.init.hf=PATH`: `abstract` is the
  new run's `StateFactory.abstract_state.params` and `shardings` its
  `state_shardings.params`, so each tensor goes straight onto its shards.
  """
  return safetensors_io.load_params(path, abstract, shardings)


def load(path: str, shardings: Any | None = None) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """Re-imports an export folder.

  Args:
    path: the folder `export` wrote.
    shardings: optional tree of Shardings to place the parameters on.

  Returns:
    (config, params, assets): the training config (tokenizer and tag files
    pointing into the folder), the parameter tree checked against the model
    that config builds, and `pipeline.Assets` (tokenizers, tag vocab and tables).
  """
  config, doc = read_config(path)
  assets = load_assets(path, config)
  if len(assets.tag_vocab) != doc["num_tags"]:
    raise ValueError(f"{path}: {TAG_VOCAB_FILE} has {len(assets.tag_vocab)} tags but "
                     f"{CONFIG_FILE} says num_tags={doc['num_tags']}")
  params = load_params(path, abstract_params(config, doc["num_tags"]), shardings)
  return config, params, assets
