"""The paper's ablation on a synthetic config: every row x every seed, one run each.

  python benchmarks/ablation.py --jobs 2                          # the grid, configs/synthetic.py:hard
  python benchmarks/ablation.py --config CONFIG[:variant] --steps 1200   # another synthetic config
  python benchmarks/ablation.py --quick                           # machinery check, < 3 min

Rows (same seeds, steps and data; `--config.x=y` overrides of the config's defaults):

  full           the config as it is (the paper's defaults, plus the departures a
                 synthetic config turns on: view-box embedding, context head, and in
                 configs/synthetic.py object crops, nearest-first order, no self-detection)
  paper          model.view_box_embedding=False loss.context_head=0.0
                 data.context_crop=union model.candidate_pool=target_box
                 data.context_order=god data.context_drop_iou=0.0 (the paper's path)
  no_god         data.context_views=False: every view slot holds the target box
  no_cond        loss.gamma=0                       (no L_cond)
  no_multi       loss.lambda_=0                     (no L_multi)
  no_cond_multi  loss.gamma=0 loss.lambda_=0        (neither)
  no_tag         loss.alpha=0 data.prompt_drop_prob=1.0 model.tag_threshold=1.01
                 (no L_tag, never a tag prompt in training; decoding selects no tag,
                 so its prompt is only "|" and EOS)
  dot            model.similarity=dot               (SigLIP-style dot product)
  vcd            eval only, on full's checkpoint: decode.contrastive_alpha=--vcd-alpha
                 (visual contrastive decoding, beyond the paper)

Each run is `python -m aligncap_jax.main` subprocesses in its own workdir
(`--workdir/<row>/seed<k>`, seed k sets `seed` and `data.shuffle_buffer_seed`):
`--mode train`, which evaluates on the validation split every `--eval-every` steps
(the curves: `eval/history.jsonl`, copied to `curve.jsonl` when training ends),
then `--mode eval` on the config's eval split (the table). `run.json` marks a
finished run; a rerun skips finished runs, and an interrupted one resumes from its
latest checkpoint. The synthetic dataset is built once into `--data-dir` (default
`--workdir/tfds`, so a grid never rebuilds anyone else's dataset); the runs share a
JAX compilation cache (`--jax-cache`), so only a row's first run compiles.

Writes `--results` (default benchmarks/results/ablation.md: mean +- std over seeds
per measure per row, with the paper's claimed direction), the same path with
`.json` (every run) and `.png` (bars with error bars per measure; validation CIDEr
and relation accuracy against steps for full, no_god, no_cond_multi).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURES = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "attr_size", "attr_colour", "attr_shape",
            "attr_relation", "attr_neighbour", "exact_match")
LABELS = {"Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr",
          "attr_size": "size", "attr_colour": "colour", "attr_shape": "shape",
          "attr_relation": "relation", "attr_neighbour": "neighbour",
          "exact_match": "exact"}
CURVE_ROWS = ("full", "paper", "no_god", "no_cond_multi")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  overrides: tuple[str, ...]
  claim: str
  eval_only: bool = False   # decodes full's checkpoint of the same seed


# The paper's path: every departure a synthetic config may turn on, off.
PAPER_PATH = ("model.view_box_embedding=False", "loss.context_head=0.0",
              "data.context_crop=union", "model.candidate_pool=target_box",
              "data.context_order=god", "data.context_drop_iou=0.0")


def rows(vcd_alpha: float) -> tuple[Row, ...]:
  """The ablation's rows, in table order."""
  return (
      Row("full", (), "reference: the paper's full model"),
      Row("paper", PAPER_PATH,
          "the paper's path: without the synthetic config's departures (issue 16)"),
      Row("no_god", ("data.context_views=False",),
          "full > row: GOD's context views give the spatial context"),
      Row("no_cond", ("loss.gamma=0.0",), "full > row: L_cond refines the latents"),
      Row("no_multi", ("loss.lambda_=0.0",), "full > row: L_multi aligns with the LLM space"),
      Row("no_cond_multi", ("loss.gamma=0.0", "loss.lambda_=0.0"),
          "full > row, below each single ablation"),
      Row("no_tag", ("loss.alpha=0.0", "data.prompt_drop_prob=1.0", "model.tag_threshold=1.01"),
          "full > row: the tag prompt and L_tag help"),
      Row("dot", ("model.similarity=dot",), "full >= row: the paper's learned scorer"),
      Row("vcd", (f"decode.contrastive_alpha={vcd_alpha:g}",),
          "beyond the paper (VCD: fewer hallucinated details, row > full)", eval_only=True),
  )


def load_config(spec: str):
  """`get_config(arg)` of a config file `path[:arg]` (ml_collections, no jax)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"error: --config {spec}: file not found")
  sys.path.insert(0, ROOT)
  module_spec = importlib.util.spec_from_file_location("ablation_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _fmt_time(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _read_jsonl(path: str) -> list[dict]:
  """Lines of a history file, one per step (the last line of a step wins: a
  resumed run repeats the evaluations after its last checkpoint)."""
  by_step = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          rec = json.loads(line)
          by_step[int(rec["step"])] = rec
  return [by_step[k] for k in sorted(by_step)]


class Grid:
  """Runs (or skips) every (row, seed) and collects their results."""

  def __init__(self, args, config):
    self.args = args
    self.workdir = os.path.abspath(args.workdir)
    self.data_dir = os.path.abspath(args.data_dir or os.path.join(self.workdir, "tfds"))
    steps = args.steps or config.train.total_steps
    if not steps:
      raise SystemExit("error: the config sets no train.total_steps; pass --steps N")
    self.steps = int(steps)
    self.eval_every = args.eval_every or max(1, self.steps // 4)
    self.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    known = {r.name: r for r in rows(args.vcd_alpha)}
    unknown = [r for r in wanted if r not in known]
    if unknown:
      raise SystemExit(f"error: --rows: unknown row(s) {unknown} (known: {list(known)})")
    self.rows = [known[r] for r in known if r in wanted]
    if any(r.eval_only for r in self.rows) and "full" not in wanted:
      raise SystemExit("error: --rows: vcd decodes the full model's checkpoints; add full")
    self.python = args.python or sys.executable
    self.durations = {"train": [], "eval_only": []}

  # ---------------------------------------------------------------- one run
  def run_dir(self, row: Row, seed: int) -> str:
    return os.path.join(self.workdir, row.name, f"seed{seed}")

  def _base_overrides(self, row: Row, seed: int) -> list[str]:
    common = [f"seed={seed}", f"data.shuffle_buffer_seed={seed}",
              f"data.data_dir={self.data_dir}", f"train.total_steps={self.steps}"]
    return common + list(self.args.override) + list(row.overrides)

  def _main(self, mode: str, workdir: str, overrides: list[str], log: str) -> None:
    cmd = [self.python, "-m", "aligncap_jax.main", "--config", self.args.config,
           "--workdir", workdir, "--mode", mode] + [f"--config.{o}" for o in overrides]
    env = dict(os.environ)
    if self.args.jax_cache:
      # Runs of one row (and train/eval of one run) compile the same programs.
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(self.args.jax_cache)
    with open(log, "a") as f:
      f.write("$ " + " ".join(cmd) + "\n")
      f.flush()
      res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
      with open(log) as f:
        tail = "".join(f.readlines()[-30:])
      raise SystemExit(f"error: --mode {mode} in {workdir} exited with {res.returncode}; "
                       f"last lines of {log}:\n{tail}")

  def run(self, row: Row, seed: int) -> dict:
    """Trains and evaluates one run (or evaluates, eval-only rows); returns its record."""
    wd = self.run_dir(row, seed)
    os.makedirs(wd, exist_ok=True)
    overrides = self._base_overrides(row, seed)
    train_s = 0.0
    if row.eval_only:
      full_ckpt = os.path.join(self.run_dir(Row("full", (), ""), seed), "checkpoints")
      link = os.path.join(wd, "checkpoints")
      if not os.path.islink(link):
        os.symlink(os.path.relpath(full_ckpt, wd), link)
    elif not os.path.isfile(os.path.join(wd, "curve.jsonl")):
      t0 = time.perf_counter()
      curve = [f"train.eval_every_steps={self.eval_every}", "data.eval_split=validation",
               f"train.eval_max_examples={self.args.curve_examples}"]
      self._main("train", wd, overrides + curve, os.path.join(wd, "train.log"))
      shutil.copyfile(os.path.join(wd, "eval", "history.jsonl"),
                      os.path.join(wd, "curve.jsonl.tmp"))
      os.replace(os.path.join(wd, "curve.jsonl.tmp"), os.path.join(wd, "curve.jsonl"))
      train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self._main("eval", wd, overrides, os.path.join(wd, "eval.log"))
    eval_s = time.perf_counter() - t0
    with open(os.path.join(wd, "eval", "metrics.json")) as f:
      metrics = json.load(f)
    source = self.run_dir(Row("full", (), ""), seed) if row.eval_only else wd
    record = {"row": row.name, "seed": seed, "workdir": wd, "config": self.args.config,
              "steps": self.steps, "overrides": overrides, "metrics": metrics,
              "curve": _read_jsonl(os.path.join(source, "curve.jsonl")),
              "train_s": round(train_s, 1), "eval_s": round(eval_s, 1)}
    with open(os.path.join(wd, "run.json.tmp"), "w") as f:
      json.dump(record, f, indent=1)
    os.replace(os.path.join(wd, "run.json.tmp"), os.path.join(wd, "run.json"))
    return record

  # ---------------------------------------------------------------- the grid
  def run_all(self) -> list[dict]:
    """Every (row, seed), `--jobs` at a time; eval-only rows wait for their seed's
    full run. Prints a progress line per run with an estimate of the time left."""
    jobs = [(row, seed) for row in self.rows for seed in self.seeds]
    # Eval-only rows need their source checkpoints: put them after the training rows.
    jobs.sort(key=lambda j: j[0].eval_only)
    start = time.perf_counter()
    records: dict[int, dict] = {}
    todo = []
    for i, (row, seed) in enumerate(jobs):
      done = os.path.join(self.run_dir(row, seed), "run.json")
      if os.path.isfile(done):
        with open(done) as f:
          records[i] = json.load(f)
        print(f"[{i + 1}/{len(jobs)}] {row.name} seed{seed}: finished before, skipped",
              flush=True)
      else:
        todo.append(i)
    if todo:
      # Build the dataset once, before runs that would otherwise race to build it.
      os.makedirs(self.workdir, exist_ok=True)
      self._main("prepare", self.workdir, self._base_overrides(Row("data", (), ""), self.seeds[0]),
                 os.path.join(self.workdir, "prepare.log"))
    lock = threading.Lock()
    pending = set(todo)

    def one(i: int, wait_for) -> dict:
      row, seed = jobs[i]
      if wait_for is not None:
        wait_for.result()        # raises if the full run it decodes failed
      tag = f"[{i + 1}/{len(jobs)}] {row.name} seed{seed}"
      print(f"{tag}: running in {self.run_dir(row, seed)}", flush=True)
      t0 = time.perf_counter()
      record = self.run(row, seed)
      took = time.perf_counter() - t0
      with lock:
        self.durations["eval_only" if row.eval_only else "train"].append(took)
        pending.discard(i)
        left = [jobs[k][0] for k in sorted(pending)]
        print(f"{tag}: done in {_fmt_time(took)}; elapsed "
              f"{_fmt_time(time.perf_counter() - start)}, estimated {self._eta(left)} left "
              f"({len(left)} runs)", flush=True)
      return record

    # FIFO: a job starts only after every job submitted before it has started, so
    # an eval-only job that waits for its full run never holds the last free worker
    # while that run is still queued.
    with concurrent.futures.ThreadPoolExecutor(max(1, self.args.jobs)) as pool:
      futures = {}
      for i in todo:
        row, seed = jobs[i]
        dep = None
        if row.eval_only:
          full = next((k for k in todo if jobs[k][0].name == "full" and jobs[k][1] == seed), None)
          dep = futures.get(full)
        futures[i] = pool.submit(one, i, dep)
      try:
        for i, fut in futures.items():
          records[i] = fut.result()
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return [records[i] for i in sorted(records)]

  def _eta(self, pending: list[Row]) -> str:
    train = self.durations["train"]
    evals = self.durations["eval_only"]
    if not pending:
      return _fmt_time(0)
    if not train and not evals:
      return "unknown"
    per_train = statistics.mean(train) if train else statistics.mean(evals)
    per_eval = statistics.mean(evals) if evals else per_train / 4
    work = sum(per_eval if r.eval_only else per_train for r in pending)
    return _fmt_time(work / max(1, self.args.jobs))


# ------------------------------------------------------------------ report


def summarise(records: list[dict], row_order: list[Row]) -> dict[str, dict[str, tuple]]:
  """{row: {measure: (mean, std, n)}} over seeds; std is the sample std (0 for n = 1)."""
  out = {}
  for row in row_order:
    runs = [r for r in records if r["row"] == row.name]
    stats = {}
    for m in MEASURES:
      vals = [float(r["metrics"][m]) for r in runs
              if m in r["metrics"] and r["metrics"][m] is not None
              and math.isfinite(float(r["metrics"][m]))]
      if vals:
        stats[m] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    len(vals))
    out[row.name] = stats
  return out


def markdown(summary, row_order: list[Row], header: str) -> str:
  measures = [m for m in MEASURES if any(m in s for s in summary.values())]
  lines = [header, "",
           "| row | seeds | " + " | ".join(LABELS[m] for m in measures) + " | claimed (paper) |",
           "|---|---|" + "---|" * len(measures) + "---|"]
  for row in row_order:
    stats = summary[row.name]
    n = max((v[2] for v in stats.values()), default=0)
    cells = []
    for m in measures:
      if m not in stats:
        cells.append("-")
        continue
      mean, std, _ = stats[m]
      digits = 2 if m in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr") else 3
      cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
    lines.append(f"| {row.name} | {n} | " + " | ".join(cells) + f" | {row.claim} |")
  return "\n".join(lines) + "\n"


def plot(path: str, summary, records: list[dict], row_order: list[Row]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  measures = [m for m in MEASURES if any(m in s for s in summary.values())]
  cols = 5
  bar_rows = -(-len(measures) // cols)
  fig = plt.figure(figsize=(4 * cols, 3.4 * (bar_rows + 1)))
  grid = fig.add_gridspec(bar_rows + 1, cols)
  names = [r.name for r in row_order]
  colours = plt.cm.tab10.colors
  for k, m in enumerate(measures):
    ax = fig.add_subplot(grid[k // cols, k % cols])
    means = [summary[n][m][0] if m in summary[n] else float("nan") for n in names]
    stds = [summary[n][m][1] if m in summary[n] else 0.0 for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3,
           color=[colours[i % 10] for i in range(len(names))])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_title(LABELS[m], fontsize=9)
    if m.startswith("attr_") or m == "exact_match":
      ax.set_ylim(0, 1)
  half = cols // 2
  for k, (m, title) in enumerate((("CIDEr", "validation CIDEr"),
                                  ("attr_relation", "validation relation accuracy"))):
    ax = fig.add_subplot(grid[bar_rows, k * half:(k + 1) * half])
    for i, name in enumerate(n for n in CURVE_ROWS if n in names):
      by_step: dict[int, list[float]] = {}
      for r in records:
        if r["row"] == name:
          for point in r["curve"]:
            if m in point:
              by_step.setdefault(int(point["step"]), []).append(float(point[m]))
      if not by_step:
        continue
      steps = sorted(by_step)
      mean = [statistics.mean(by_step[s]) for s in steps]
      std = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
      ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=name,
                  color=colours[names.index(name) % 10])
    ax.set_xlabel("training step")
    ax.set_title(title, fontsize=9)
    if m == "attr_relation":
      ax.set_ylim(0, 1)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_report(results: str, records: list[dict], row_order: list[Row], header: str) -> str:
  summary = summarise(records, row_order)
  table = markdown(summary, row_order, header)
  base, _ = os.path.splitext(results)
  os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
  with open(results, "w") as f:
    f.write(table)
  with open(base + ".json", "w") as f:
    json.dump({"runs": records,
               "summary": {r: {m: {"mean": v[0], "std": v[1], "n": v[2]} for m, v in s.items()}
                           for r, s in summary.items()}}, f, indent=1)
  plot(base + ".png", summary, records, row_order)
  return table


# ------------------------------------------------------------------ main

# --quick: 2 rows, 1 seed, a few steps on a small synthetic set of its own, with
# every tower one layer deep and a few units wide (about configs/tiny.py's sizes)
# and the pairwise losses in their direct (dense) form, the cheapest to compile:
# compiling and starting processes dominate such a run.
QUICK_OVERRIDES = (
    "data.synthetic.num_train_images=24", "data.synthetic.num_validation_images=4",
    "data.synthetic.num_test_images=4", "data.synthetic.image_size=64", "data.view_size=32",
    "data.clip_max_tokens=16",
    "train.per_device_batch_size=8", "train.eval_batch_size=8", "train.eval_max_examples=8",
    "train.log_every_steps=2", "train.checkpoint_every_steps=2", "decode.max_new_tokens=8",
    "model.vision.image_size=32", "model.vision.hidden_size=32", "model.vision.num_heads=2",
    "model.vision.mlp_dim=64", "model.vision.num_layers=1",
    "model.qformer.num_query_tokens=4", "model.qformer.hidden_size=32",
    "model.qformer.num_heads=2", "model.qformer.intermediate_size=64",
    "model.qformer.encoder_hidden_size=32", "model.qformer.num_layers=1",
    "model.llm.d_model=32", "model.llm.d_kv=8", "model.llm.d_ff=64", "model.llm.num_layers=1",
    "model.llm.num_decoder_layers=1",
    "model.clip_text.hidden_size=32", "model.clip_text.num_heads=2",
    "model.clip_text.intermediate_size=64", "model.clip_text.projection_dim=32",
    "model.roi_output_size=4", "model.cross_view.num_heads=2", "model.pairwise_form=dense",
    "model.tagging.dim=16", "model.tagging.num_heads=2", "model.tagging.mlp_dim=32",
    "model.tagging.num_layers=1",
    "model.scorer.dim=16", "model.scorer.num_heads=2", "model.scorer.mlp_dim=32",
    "model.scorer.num_layers=1",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None,
                 help="config file[:variant] (default configs/synthetic.py:hard, the harder "
                      "benchmark; configs/synthetic.py with --quick)")
  p.add_argument("--workdir", default=None,
                 help="runs go to WORKDIR/<row>/seed<k> (default workdirs/ablation, "
                      "workdirs/ablation_quick with --quick)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir (default WORKDIR/tfds)")
  p.add_argument("--results", default=None,
                 help="markdown table; .json and .png beside it (default "
                      "benchmarks/results/ablation.md, WORKDIR/ablation.md with --quick)")
  p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick 0)")
  p.add_argument("--rows", default=None,
                 help=f"comma-separated subset of {','.join(r.name for r in rows(1.0))} "
                      f"(default all; --quick full,no_god)")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps (default: the config's train.total_steps)")
  p.add_argument("--eval-every", type=int, default=None,
                 help="validation evaluation every N steps (default steps // 4)")
  p.add_argument("--curve-examples", type=int, default=100,
                 help="validation regions per curve point (0: the whole split)")
  p.add_argument("--vcd-alpha", type=float, default=1.0, help="decode.contrastive_alpha of vcd")
  p.add_argument("--override", action="append", default=[],
                 help="x=y, a --config.x=y for every run (repeatable)")
  p.add_argument("--jobs", type=int, default=1,
                 help="runs at a time (each a process sequence of its own; on 2 cores, 2 "
                      "jobs give about 1.2x the throughput of 1)")
  p.add_argument("--python", default=None, help="interpreter for the runs (default: this one)")
  p.add_argument("--jax-cache", default=None,
                 help="JAX persistent compilation cache for the runs (default WORKDIR/jax_cache; "
                      "'' for none)")
  p.add_argument("--quick", action="store_true",
                 help="full and no_god, seed 0, 4 steps of a tiny model (one-layer towers, "
                      "dense pairwise losses) on a small dataset of its own: checks the "
                      "machinery, not the numbers")
  args = p.parse_args(argv)
  if args.quick:
    args.config = args.config or "configs/synthetic.py"
    args.rows = args.rows or "full,no_god"
    args.seeds = args.seeds or "0"
    args.steps = args.steps or 4
    args.eval_every = args.eval_every or 2
    args.curve_examples = 4
    args.override = list(QUICK_OVERRIDES) + args.override
    args.workdir = args.workdir or os.path.join(ROOT, "workdirs", "ablation_quick")
    args.results = args.results or os.path.join(args.workdir, "ablation.md")
  args.config = args.config or "configs/synthetic.py:hard"
  args.rows = args.rows or ",".join(r.name for r in rows(1.0))
  args.seeds = args.seeds or "0,1,2"
  args.workdir = args.workdir or os.path.join(ROOT, "workdirs", "ablation")
  if args.jax_cache is None:
    args.jax_cache = os.path.join(args.workdir, "jax_cache")
  args.results = args.results or os.path.join(ROOT, "benchmarks", "results", "ablation.md")
  if args.vcd_alpha <= 0:
    p.error("--vcd-alpha must be > 0")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  args.config = os.path.abspath(args.config.partition(":")[0]) + (
      ":" + args.config.partition(":")[2] if ":" in args.config else "")
  config = load_config(args.config)
  grid = Grid(args, config)
  jobs = len(grid.rows) * len(grid.seeds)
  print(f"ablation: {len(grid.rows)} rows x {len(grid.seeds)} seeds = {jobs} runs of "
        f"{grid.steps} steps ({args.config}), validation every {grid.eval_every} steps; "
        f"runs in {grid.workdir}, data in {grid.data_dir}", flush=True)
  t0 = time.perf_counter()
  records = grid.run_all()
  header = (f"Ablation on `{os.path.relpath(args.config, ROOT)}`, {grid.steps} steps, seeds "
            f"{','.join(map(str, grid.seeds))}: mean ± std over seeds (sample std) on the "
            f"eval split; BLEU-4/METEOR/ROUGE-L/CIDEr x100, attributes and exact match as "
            f"fractions. Written by `benchmarks/ablation.py`.")
  print(write_report(args.results, records, grid.rows, header))
  print(f"wrote {args.results} (+ .json, .png); wall time {_fmt_time(time.perf_counter() - t0)}")


if __name__ == "__main__":
  main()
