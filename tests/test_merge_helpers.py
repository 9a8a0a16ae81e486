"""Helpers for the `test_merge_*` files (no tests here): tiny safetensors checkpoints
written with numpy (no torch, fast), YAML configs, and running the real CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ckpt(path, seed, layers=2, dtype=np.float32, shape=(4, 6), tokenizer=True):
  """A Llama-named checkpoint: embed, `layers` x (q_proj, norm), final norm, lm_head."""
  from safetensors.numpy import save_file
  r = np.random.default_rng(seed)
  t = {"model.embed_tokens.weight": r.normal(size=shape)}
  for i in range(layers):
    t[f"model.layers.{i}.self_attn.q_proj.weight"] = r.normal(size=(shape[1], shape[1]))
    t[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * r.normal(size=shape[1])
  t["model.norm.weight"] = 1 + 0.1 * r.normal(size=shape[1])
  t["lm_head.weight"] = r.normal(size=shape)
  os.makedirs(path, exist_ok=True)
  save_file({k: v.astype(dtype) for k, v in t.items()}, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"num_hidden_layers": layers, "architectures": ["LlamaForCausalLM"]}, f)
  if tokenizer:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({"model_max_length": 64, "seed": seed}, f)
  return str(path)


def write_yaml(path, cfg):
  with open(path, "w") as f:
    f.write(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
  return str(path)


def run_cli(*args, timeout=300):
  """The real command line in a subprocess: `(returncode, stdout, stderr)`."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "merging.cli", *map(str, args)], env=env,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr
