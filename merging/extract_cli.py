"""`lora-jax extract-lora`: a PEFT LoRA adapter from the difference of two checkpoints.

mergekit's `mergekit-extract-lora`, over Hugging Face safetensors checkpoints, one
tensor pair in memory at a time. For each linear weight `W` (PyTorch `(out, in)`) the
task vector `D = W_ft - W_base` is factored by truncated SVD `U S Vh`:
`lora_A = sqrt(S_r) Vh_r`, `lora_B = U_r sqrt(S_r)` (`--no-distribute-scale`:
`lora_A = S_r Vh_r`, `lora_B = U_r`), written with `lora_alpha = r` (scale 1).

Which tensors become what follows mergekit, read from tensor names (mergekit builds the
torch modules; we read names, which for Hugging Face decoders say the same):
- `*.weight` of 2-D shape: a LoRA module;
- the input embeddings (`*embed_tokens*`, `*wte*`) and `lm_head`: kept at full rank in
  `modules_to_save` unless `--embed-lora` (then the embedding is factored like
  mergekit, as `lora_embedding_A/B`), also when the vocabulary sizes differ;
- 1-D weights (norms): no low-rank form, kept at full rank in `modules_to_save`
  (`--skip-undecomposable` drops them);
- `--save-module NAME`: kept at full rank; `-i/--include-regex`, `-e/--exclude-regex`
  (`re.search` on the module name) select what is extracted.
Reading and writing go through `lora_jax.checkpoint`: headers validated, files only
inside the directories named, and the output directory written atomically (a
temporary sibling renamed into place; a killed run leaves the old output or none, and
the next run removes its temporary directory).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

from lora_jax import checkpoint


EMBED_RX = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings)$")
OUTPUT_EMBED = ("lm_head", "embed_out")


def _svd(d: np.ndarray, max_rank: int, distribute_scale: bool, sv_epsilon: float):
  """(lora_A (r, in), lora_B (out, r)) float32 of `d (out, in)`: `lj.extract_lora`'s
  factors, in PyTorch's layout (`lora_B @ lora_A = U_r S_r Vh_r`)."""
  import jax.numpy as jnp

  from lora_jax.extend import svd_factors
  b, a = svd_factors(jnp.asarray(d, jnp.float32), max_rank, distribute_scale, sv_epsilon)
  return np.asarray(a), np.asarray(b)


def plan(model_tensors: dict, base_tensors: dict, *, embed_lora: bool,
         modules_to_save: Sequence[str], include: Sequence[str], exclude: Sequence[str],
         skip_undecomposable: bool) -> tuple[list, list, list[str]]:
  """-> (lora modules [(module, transpose)], full tensors [name], modules_to_save)."""
  to_save = list(modules_to_save)
  # other tensors (buffers such as an old checkpoint's rotary_emb.inv_freq) belong to no
  # weight-bearing module: mergekit leaves them out too
  names = [n for n in model_tensors if n.endswith(".weight")]
  embeds = {n[:-7] for n in names if EMBED_RX.search(n[:-7])}
  embeds |= {n[:-7] for n in names if n[:-7] in OUTPUT_EMBED}
  vocab = {m: model_tensors[m + ".weight"].shape[0] for m in embeds}
  base_vocab = {m: base_tensors[m + ".weight"].shape[0] for m in embeds
                if m + ".weight" in base_tensors}
  if embed_lora and any(vocab[m] != base_vocab.get(m) for m in embeds):
    embed_lora = False        # mergekit: a resized vocabulary forces full embeddings

  def extract(name):
    if include and not any(re.search(r, name) for r in include):
      return False
    return not any(re.search(r, name) for r in exclude)

  lora, full = [], []
  for n in names:
    module = n[:-len(".weight")]
    key = module.rsplit(".", 1)[-1]
    if not embed_lora and module in embeds and not any(re.search(r, module) for r in exclude):
      if key not in to_save:
        to_save.append(key)
    if module in to_save or key in to_save:
      full.append(n)
      if module + ".bias" in model_tensors:
        full.append(module + ".bias")
    elif extract(module):
      shape = model_tensors[n].shape
      if len(shape) == 2:
        if module + ".bias" in model_tensors:
          raise ValueError(f"{module}: has a bias; extracting LoRA for biased layers "
                           "(PEFT lora_bias) is not supported")
        lora.append((module, module in embeds and not module.endswith(OUTPUT_EMBED)))
      elif not skip_undecomposable:
        if key not in to_save:
          to_save.append(key)
        full.append(n)
  return lora, full, to_save


def extract(model: str, base_model: str, out_path: str, *, max_rank: int = 128,
            distribute_scale: bool = True, embed_lora: bool = False,
            modules_to_save: Sequence[str] = (), include: Sequence[str] = (),
            exclude: Sequence[str] = (), sv_epsilon: float = 0.0,
            skip_undecomposable: bool = False, overwrite: bool = False,
            quiet: bool = False) -> dict:
  """Write a PEFT adapter approximating `model - base_model` to `out_path`.

  Returns the adapter config written. Raises `ValueError` / `FileNotFoundError` naming
  the tensor and the models before any output is written.
  """
  from tqdm import tqdm

  if max_rank < 1:
    raise ValueError(f"--max-rank {max_rank} must be >= 1")
  if os.path.exists(out_path) and not overwrite:
    raise ValueError(f"{out_path} exists; pass --overwrite to replace it")
  ft, base = checkpoint.open_checkpoint(model), checkpoint.open_checkpoint(base_model)
  read = checkpoint.read_any
  lora, full, to_save = plan(ft.tensors, base.tensors, embed_lora=embed_lora,
                             modules_to_save=modules_to_save, include=include,
                             exclude=exclude, skip_undecomposable=skip_undecomposable)
  for module, _ in lora:
    name = module + ".weight"
    if name not in base.tensors:
      raise ValueError(f"tensor {name} is in {model} but missing in {base_model}")
    if base.tensors[name].shape != ft.tensors[name].shape:
      raise ValueError(f"tensor {name}: shape {list(ft.tensors[name].shape)} in {model} "
                       f"but {list(base.tensors[name].shape)} in {base_model}")
  if not lora:
    raise ValueError("no module to extract: every weight was excluded or is kept in full")

  tensors, ranks = {}, {}
  for module, transpose in tqdm(lora, desc="extracting LoRA", unit="module", disable=quiet):
    name = module + ".weight"
    w_ft = read(ft.tensors[name])
    d = w_ft.astype(np.float32) - read(base.tensors[name]).astype(np.float32)
    a, b = _svd(d.T if transpose else d, max_rank, distribute_scale, sv_epsilon)
    a, b = a.astype(w_ft.dtype), b.astype(w_ft.dtype)
    kind, suffix = ("lora_embedding", "") if transpose else ("lora", ".weight")
    tensors[f"base_model.model.{module}.{kind}_A{suffix}"] = np.ascontiguousarray(a)
    tensors[f"base_model.model.{module}.{kind}_B{suffix}"] = np.ascontiguousarray(b)
    ranks[module] = a.shape[0]
  for name in full:
    tensors[f"base_model.model.{name}"] = read(ft.tensors[name])
  r = max(ranks.values())
  differ = {m: k for m, k in ranks.items() if k != r}
  config = {
      "base_model_name_or_path": base_model, "peft_type": "LORA", "use_rslora": False,
      "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
      "modules_to_save": to_save, "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
      "rank_pattern": differ, "alpha_pattern": dict(differ), "lora_dropout": 0.0,
      "fan_in_fan_out": False, "inference_mode": True,
  }
  with checkpoint.atomic_directory(out_path) as tmp:
    checkpoint.write_safetensors(tmp / checkpoint.WEIGHTS_NAME, tensors, {"format": "pt"})
    checkpoint.write_json(tmp / checkpoint.CONFIG_NAME, config)
  if not quiet:
    print(f"wrote {len(ranks)} LoRA modules (rank <= {r}) and {len(full)} full tensors "
          f"to {out_path}", file=sys.stderr)
  return config


def add_parser(sub) -> None:
  e = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from base and fine-tuned "
                     "checkpoints (mergekit-extract-lora)")
  e.add_argument("--model", required=True, help="fine-tuned checkpoint directory")
  e.add_argument("--base-model", required=True, help="base checkpoint directory")
  e.add_argument("--out-path", required=True, help="adapter directory to write")
  e.add_argument("--max-rank", type=int, default=128)
  e.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True)
  e.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False)
  e.add_argument("--save-module", action="append", default=[], dest="modules_to_save")
  e.add_argument("-i", "--include-regex", action="append", default=[], dest="include")
  e.add_argument("-e", "--exclude-regex", action="append", default=[], dest="exclude")
  e.add_argument("--sv-epsilon", type=float, default=0.0)
  e.add_argument("--skip-undecomposable", action="store_true")
  e.add_argument("--overwrite", action="store_true")
  e.add_argument("--quiet", action="store_true")


def run_args(args) -> None:
  extract(args.model, args.base_model, args.out_path, max_rank=args.max_rank,
          distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
          modules_to_save=args.modules_to_save, include=args.include, exclude=args.exclude,
          sv_epsilon=args.sv_epsilon, skip_undecomposable=args.skip_undecomposable,
          overwrite=args.overwrite, quiet=args.quiet)
