"""`lora-jax train CONFIG.yml [--set key=value ...]`: the command line of `training.train`."""

from __future__ import annotations

import json

import yaml


def add_parser(sub) -> None:
  t = sub.add_parser("train", help="LoRA fine-tune a Hugging Face checkpoint on JSONL data "
                     "from a YAML config")
  t.add_argument("config", help="YAML config file (see README: fine-tune your checkpoint)")
  t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                 help="override a config key (YAML value; dotted keys for sections, e.g. "
                      "lora.r=8); repeatable")
  t.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                 help="stop (checkpointed) after this step; rerun to continue")
  t.add_argument("--compile-cache", default=None, metavar="DIR",
                 help="JAX's persistent compilation cache (default OUTPUT_DIR/jax_cache), so "
                      "a resumed run does not compile again; 'none' to turn it off")


def _override(d: dict, item: str) -> None:
  key, sep, value = item.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {item!r}: expected KEY=VALUE")
  *head, last = key.split(".")
  node = d
  for h in head:
    node = node.setdefault(h, {})
    if not isinstance(node, dict):
      raise ValueError(f"--set {item!r}: {h!r} is not a section")
  node[last] = yaml.safe_load(value)


def _compile_cache(where: str | None, output_dir: str) -> None:
  """A restarted run (after a crash, a preemption, `--stop-after`) finds its programs
  compiled: XLA's compile is the first step's largest cost."""
  import os
  import jax
  if where == "none" or jax.config.jax_compilation_cache_dir:
    return            # off, or the user's own cache (JAX_COMPILATION_CACHE_DIR)
  path = where or os.path.join(output_dir, "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_args(args) -> None:
  import pathlib
  from training import config as tconfig
  from training.trainer import train
  if args.overrides:
    p = pathlib.Path(args.config)
    c = tconfig.load_config(p)      # validates the file itself first
    d = yaml.safe_load(p.read_text(encoding="utf-8"))
    for item in args.overrides:
      _override(d, item)
    cfg = tconfig.from_dict(d, p.parent)
  else:
    cfg = tconfig.load_config(args.config)
  _compile_cache(args.compile_cache, cfg.output_dir)
  result = train(cfg, stop_after=args.stop_after)
  summary = {k: result[k] for k in ("output_dir", "adapter_dir", "steps", "resumed_from")
             if k in result}
  if result["losses"]:
    last = max(result["losses"])
    summary["loss"] = round(result["losses"][last], 6)
  if result["eval_losses"]:
    summary["eval_loss"] = round(result["eval_losses"][max(result["eval_losses"])], 6)
  print(json.dumps(summary))


__all__ = ["add_parser", "run_args"]
