"""`lora-jax train`: a LoRA fine-tune of a Hugging Face checkpoint, from a config.

    from training import train
    result = train("config.yml")        # or a TrainConfig, or a dict

One run:

1. reads the base (`models.load_hf`, any family; bnb-4bit and compressed-tensors
   checkpoints come quantized), optionally quantizes it (`quantize:`), puts LoRA on it
   (`lora:`; PiSSA / OLoRA / LoftQ inits, DoRA, QA-LoRA, IEC) and shards it over the
   mesh (`mesh:`, through `lj.shard`);
2. tokenizes and packs the JSONL data (`training.data`), loss on completion / assistant
   tokens only, no attention across packed examples;
3. runs jitted optimizer steps (optax; gradient accumulation by a scan over
   micro-batches; activation checkpointing by `remat:`; a chunked cross-entropy that
   never builds the full float32 logits), with a tqdm bar (loss, tokens/s, memory),
   metrics appended to `metrics.jsonl`, eval loss every `eval_every` steps;
4. checkpoints with orbax every `save_every` steps (adapter, optimizer state, step,
   data position; the last `keep_checkpoints` kept) and resumes from the last one: a
   run killed at any point and restarted produces the same losses, step for step, as
   one never interrupted (the data order is a function of the seed and the epoch, the
   dropout key of the step);
5. writes `adapter/` (a PEFT adapter directory; PiSSA / OLoRA adapters converted for
   the original base), optionally `merged/` (the merged Hugging Face checkpoint) or
   `folded_int4/` (QA-LoRA folded into its int4 base), and `loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import resource
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import checkpoint as ckio
from lora_jax import models
from training import checkpoints as ckpts
from training import data as tdata
from training.config import TrainConfig, from_dict, load_config
from training.loss import chunked_loss

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


# ----------------------------------------------------------------------------
# model, adapter, mesh

def _dtype(name: str | None):
  return None if name is None else jnp.dtype(name)


def load_base(c: TrainConfig, calibration: Mapping[str, np.ndarray] | None = None):
  """`(DecoderConfig, params)` of the base, quantized as `c.quantize` says.

  `calibration`: packed training rows (`load_rows(...).rows`) for `method: gptq`, which
  calibrates on the first `calibration_rows` of them in file order (deterministic)."""
  config, params = models.load_hf(c.base_model, dtype=_dtype(c.compute_dtype),
                                  stacked=c.stacked)
  return config, quantize_base(c, config, params, calibration)


def quantize_base(c: TrainConfig, config, params, calibration=None):
  """`params` with the layers' projections quantized as `c.quantize` says (RTN, or GPTQ
  calibrated through the model's own forward on training rows)."""
  import quantization as qz
  if c.quantize is None or c.lora.init == "loftq":
    return params
  q = c.quantize
  qc = qz.QuantConfig(q.format, symmetric=q.symmetric, targets=_quant_targets(c.stacked),
                      icq=q.icq, **_quant_kw(q))
  if q.method != "gptq":
    return qz.quantize(params, qc)
  if calibration is None:
    raise ValueError("quantize.method gptq needs calibration rows (the training data)")
  ids = np.asarray(calibration["input_ids"])[:q.calibration_rows]
  seg = calibration.get("segment_ids")
  seg = None if seg is None else np.asarray(seg)[:q.calibration_rows]
  n = c.batch_size
  batches = [(jnp.asarray(ids[i:i + n]), None if seg is None else jnp.asarray(seg[i:i + n]))
             for i in range(0, len(ids), n)]

  def forward(p, batch):          # packed examples stay apart, as in training
    x, s = batch
    return models.forward(p, config, x, **({} if s is None else {"segment_ids": s}))
  return qz.gptq(params, forward, batches, qc, progress=False)


def _quant_kw(q) -> dict:
  """The QuantConfig options the config sets (the others keep QuantConfig's defaults,
  which depend on the format)."""
  kw = {}
  if q.block_size is not None:
    kw["block_size"] = q.block_size
  if q.double_quant is not None:
    kw["double_quant"] = q.double_quant
  return kw


def _quant_targets(stacked: bool) -> str:
  # the projections of attention and MLP (not experts, router, embeddings, head)
  return r"layers/(\d+/)?(self_attn|mlp)/\w+_proj/kernel"


def lora_config(c: TrainConfig) -> lj.LoraConfig:
  from lora_jax.models import decoder
  s = c.lora
  init = "default" if s.init == "loftq" else s.init
  layouts = decoder.STACKED_LAYOUTS if c.stacked else decoder.EXPERT_LAYOUTS
  return lj.LoraConfig(
      rank=s.r, alpha=s.alpha, targets=s.targets, rslora=s.rslora, init=init,
      rank_pattern=dict(s.rank_pattern), alpha_pattern=dict(s.alpha_pattern),
      dropout=s.dropout, layouts=layouts, use_dora=s.use_dora,
      modules_to_save=s.modules_to_save, use_qalora=s.use_qalora,
      qalora_group_size=s.qalora_group_size, use_iec=s.use_iec)


def add_adapter(c: TrainConfig, key: jax.Array, base) -> Any:
  """The LoRA tree on `base` (LoftQ quantizes the LoRA targets itself)."""
  cfg = lora_config(c)
  if c.lora.init == "loftq":
    import quantization as qz
    q = c.quantize or _default_quant()
    return qz.loftq(key, base, cfg, qz.QuantConfig(q.format, **_quant_kw(q)),
                    iters=c.lora.loftq_iters)
  return lj.init(key, base, cfg)


def _default_quant():
  from training.config import QuantizeSection
  return QuantizeSection()


def make_mesh(c: TrainConfig, devices=None) -> Mesh:
  """The `(data, fsdp, model)` mesh over `devices` (default all)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.model]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh: {dataclasses.asdict(c.mesh)} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh: data x fsdp x model = {sizes[0]} x {sizes[1]} x {sizes[2]} = "
                     f"{math.prod(sizes)}, but there are {n} devices")
  return Mesh(np.asarray(devices).reshape(sizes), ("data", "fsdp", "model"))


_COLUMN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
_ROW = ("o_proj", "down_proj")


def param_spec(mesh: Mesh):
  """`(path, leaf) -> PartitionSpec` of a dense base weight: column-parallel projections
  split `out` over `model` and `in` over `fsdp`, row-parallel ones the reverse, the
  embedding and head their vocabulary over `model`; an axis that does not divide is
  left whole (small models on big meshes)."""
  sizes = dict(mesh.shape)

  def fits(dim, axis):
    return axis is None or dim % sizes[axis] == 0

  def spec(path: str, leaf) -> P:
    shape = tuple(leaf.shape)
    name = path.split("/")[-2] if "/" in path else path
    last = path.split("/")[-1]
    if last == "kernel" and name in _COLUMN + _ROW + ("gate", "lm_head"):
      ins, outs = ("model", "fsdp") if name in _ROW else ("fsdp", "model")
      if name == "gate":
        ins, outs = "fsdp", None
    elif "experts" in path.split("/") and len(shape) >= 3:
      ins, outs = ("model", "fsdp") if last == "down_proj" else ("fsdp", "model")
    elif last == "embedding":
      ins, outs = "model", "fsdp"      # (vocab, hidden)
    else:
      return P()
    ins = ins if fits(shape[-2], ins) else None
    outs = outs if fits(shape[-1], outs) else None
    return P(*([None] * (len(shape) - 2)), ins, outs)
  return spec


# ----------------------------------------------------------------------------
# data

def load_rows(path: str, tok, seq_len: int, what: str) -> tdata.Packed:
  examples = tdata.read_jsonl(path)
  packed = tdata.pack((tdata.tokenize_example(e, tok) for e in examples), seq_len,
                      pad_id=tok.pad_id if tok.pad_id is not None else 0)
  if not len(packed.rows["input_ids"]):
    raise ValueError(f"{path}: no {what} example has a target token left")
  return packed


def _check_vocab(rows, config, path):
  top = int(rows["input_ids"].max())
  if top >= config.vocab_size:
    raise ValueError(f"{path}: token id {top} is outside the model's vocabulary "
                     f"(vocab_size={config.vocab_size}); is the tokenizer the model's?")


# ----------------------------------------------------------------------------
# the step

def make_optimizer(c: TrainConfig) -> tuple[optax.GradientTransformation, Any]:
  warm = c.warmup_steps
  if c.lr_schedule == "constant":
    sched = optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warm),
                                  optax.constant_schedule(c.learning_rate)], [warm]) \
        if warm else optax.constant_schedule(c.learning_rate)
  elif c.lr_schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(0.0 if warm else c.learning_rate,
                                               c.learning_rate, warm, max(c.max_steps, warm + 1),
                                               end_value=0.0)
  else:
    sched = optax.join_schedules([
        optax.linear_schedule(0.0, c.learning_rate, warm),
        optax.linear_schedule(c.learning_rate, 0.0, max(1, c.max_steps - warm))], [warm])
  if c.optimizer == "sgd":
    factory, kw = optax.sgd, {}
  elif c.optimizer == "adam":
    factory, kw = optax.adam, dict(b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps)
  else:
    factory, kw = optax.adamw, dict(b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps,
                                   weight_decay=c.weight_decay)
  if c.loraplus_lr_ratio is not None:
    opt = lj.loraplus(factory, sched, c.loraplus_lr_ratio, **kw)
  else:
    opt = factory(sched, **kw)
  if c.max_grad_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), opt)
  return opt, sched


def loss_terms(params, config, batch, remat, chunk):
  """`(sum of token losses, number of target tokens)` of one micro-batch of packed
  rows: token t predicts token t + 1 where `loss_mask[t + 1]` (never across segments:
  the first token of a segment is not a target)."""
  ids = batch["input_ids"]
  h = lj.implicit(models.hidden_states)(params, config, ids[:, :-1],
                                        positions=batch["positions"][:, :-1],
                                        segment_ids=batch["segment_ids"][:, :-1], remat=remat)
  return lj.implicit(chunked_loss)(params, config, h, ids[:, 1:], batch["loss_mask"][:, 1:],
                                   chunk)


def make_train_step(c: TrainConfig, config, opt, dropout: bool):
  """`step(adapter, opt_state, frozen, batches (k, B, T), step) -> (adapter, opt_state,
  loss, tokens)`: gradients summed over the k micro-batches by a scan, divided by the
  target tokens of all of them (the loss of the whole batch, as one big batch would
  give). The frozen base is an argument, not a constant captured by the program: XLA
  would otherwise embed the weights in the compiled program (measured: a 275 MB program
  and +282 MiB resident for a 131 MiB base, benchmarks/train_memory.py)."""
  key0 = jax.random.key(c.seed + 1)

  def micro(adapter, frozen, batch, key):
    def f(ad):
      params = lj.combine(ad, frozen)
      if dropout:
        params = lj.with_dropout_rng(params, key)
      return loss_terms(params, config, batch, c.remat, c.loss_chunk)
    (s, n), g = _vg(f, adapter)
    return s, n, g

  def step(adapter, opt_state, frozen, batches, step_no):
    key = jax.random.fold_in(key0, step_no)
    keys = jax.random.split(key, c.grad_accum)
    zero = jax.tree.map(jnp.zeros_like, adapter)

    def body(carry, xs):
      s_acc, n_acc, g_acc = carry
      batch, k = xs
      s, n, g = micro(adapter, frozen, batch, k)
      return (s_acc + s, n_acc + n, jax.tree.map(jnp.add, g_acc, g)), None

    (s, n, g), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zero),
                                (batches, keys))
    denom = jnp.maximum(n, 1.0)
    g = jax.tree.map(lambda x: x / denom.astype(x.dtype), g)
    updates, opt_state = opt.update(g, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, s / denom, n
  return step


def _vg(f, adapter):
  """Value and gradient of the loss sum; the token count rides along."""
  (s, n), vjp = jax.vjp(f, adapter)
  (g,) = vjp((jnp.ones_like(s), jnp.zeros_like(n)))
  return (s, n), g


def make_eval_step(c: TrainConfig, config):
  def ev(adapter, frozen, batch):
    return loss_terms(lj.combine(adapter, frozen), config, batch, "none", c.loss_chunk)
  return ev


# ----------------------------------------------------------------------------
# logging

def peak_rss_bytes() -> int:
  """The process's peak resident memory (Linux reports KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Metrics:
  """`metrics.jsonl` in the output directory: one JSON object per logged step. On
  resume, records past the restored step are dropped (the run repeats them)."""

  def __init__(self, path: pathlib.Path, resume_step: int):
    self.path = path
    kept = []
    if path.exists() and resume_step > 0:
      for line in path.read_text().splitlines():
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue              # a line cut by a crash
        if rec.get("step", 0) <= resume_step:
          kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))

  def write(self, rec: Mapping[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(rec) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def read(self) -> list[dict]:
    return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]


def plot_losses(records: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
  ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if tr:
    ax.plot(*zip(*tr), label="train")
  if ev:
    ax.plot(*zip(*ev), "o-", label="eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / target token)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------
# the run

def _as_config(config: TrainConfig | Mapping | str | os.PathLike) -> TrainConfig:
  if isinstance(config, TrainConfig):
    return config
  if isinstance(config, Mapping):
    return from_dict(config)
  return load_config(config)


def train(config: TrainConfig | Mapping | str | os.PathLike, *, devices=None,
          stop_after: int | None = None) -> dict:
  """Run (or resume) the fine-tune `config` describes.

  Args:
    config: a `TrainConfig`, a mapping of its keys, or the path of a YAML file.
    devices: the devices of the mesh (default all).
    stop_after: stop once this step is done (and checkpointed), as an interruption
      would; for tests and for splitting a run.

  Returns:
    `{"losses": {step: loss}, "eval_losses": {step: loss}, "output_dir", "adapter_dir",
    "steps", "resumed_from", "seconds", "tokens_per_s", "peak_rss_bytes"}`.
  """
  c = _as_config(config)
  out = pathlib.Path(c.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok = tdata.load_tokenizer(c.base_model)
  model_config, base = models.load_hf(c.base_model, dtype=_dtype(c.compute_dtype),
                                      stacked=c.stacked)
  train_rows = load_rows(c.data, tok, c.seq_len, "training")
  _check_vocab(train_rows.rows, model_config, c.data)
  base = quantize_base(c, model_config, base, train_rows.rows)
  eval_rows = None
  if c.eval_data:
    eval_rows = load_rows(c.eval_data, tok, c.seq_len, "eval")
    _check_vocab(eval_rows.rows, model_config, c.eval_data)
  if len(train_rows.rows["input_ids"]) < c.batch_size:
    raise ValueError(f"{c.data}: packs into {len(train_rows.rows['input_ids'])} rows of "
                     f"seq_len {c.seq_len}, fewer than batch_size {c.batch_size}")

  params = add_adapter(c, jax.random.key(c.seed), base)
  mesh = make_mesh(c, devices)
  params = lj.shard(params, mesh, param_spec(mesh))
  adapter, frozen = lj.split(params)
  opt, sched = make_optimizer(c)
  repl = NamedSharding(mesh, P())
  ad_sh = jax.tree.map(lambda x: x.sharding, adapter)
  opt_state = jax.jit(opt.init, out_shardings=None)(adapter)
  st_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
                       else repl, opt_state)
  opt_state = jax.device_put(opt_state, st_sh)

  manager = ckpts.Manager(out / "checkpoints", keep=c.keep_checkpoints)
  start_step, position = 0, tdata.Position(0, 0)
  if manager.latest_step() is not None:
    where = str(out / "checkpoints")
    if not c.resume:
      raise ValueError(f"{where} holds checkpoints (steps {manager.all_steps()}) and "
                       "resume is false; use another output_dir or resume: true")
    adapter, opt_state, meta = manager.restore(manager.latest_step(), adapter, opt_state)
    ckpts.check_compatible(meta, c, len(train_rows.rows["input_ids"]), where)
    start_step, position = int(meta["step"]), tdata.Position(*meta["position"])

  dropout = c.lora.dropout > 0
  batch_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
  step_fn = jax.jit(make_train_step(c, model_config, opt, dropout),
                    out_shardings=(ad_sh, st_sh, repl, repl), donate_argnums=(0, 1))
  eval_fn = jax.jit(make_eval_step(c, model_config), out_shardings=(repl, repl))
  batches = tdata.Batches(train_rows.rows, c.batch_size, c.seed, start=position)

  metrics = Metrics(out / "metrics.jsonl", start_step)
  losses, eval_losses = {}, {}
  last = min(c.max_steps, stop_after) if stop_after is not None else c.max_steps
  bar = None
  if c.progress:
    from tqdm import tqdm
    bar = tqdm(total=c.max_steps, initial=start_step, desc="train", unit="step",
               dynamic_ncols=True)
  t0 = time.perf_counter()
  tokens_done = 0
  for step in range(start_step, last):
    micro = [next(batches) for _ in range(c.grad_accum)]
    stacked = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
    tokens_done += int(np.count_nonzero(stacked["segment_ids"]))     # not padding
    stacked = jax.device_put(stacked, batch_sh)
    adapter, opt_state, loss, ntok = step_fn(adapter, opt_state, frozen, stacked,
                                             jnp.int32(step))
    done = step + 1
    loss_f = float(loss)
    if not math.isfinite(loss_f):
      raise FloatingPointError(f"step {done}: loss is {loss_f}; lower learning_rate or "
                               "check the data")
    losses[done] = loss_f
    dt = time.perf_counter() - t0
    rec = {"step": done, "loss": loss_f, "lr": float(sched(step)), "target_tokens": int(ntok),
           "tokens_per_s": tokens_done / dt,
           "peak_rss_bytes": peak_rss_bytes(), "seconds": dt}
    if eval_rows is not None and (c.eval_every and done % c.eval_every == 0 or done == c.max_steps):
      rec["eval_loss"] = eval_losses[done] = evaluate(eval_fn, adapter, frozen,
                                                      eval_rows.rows, c, batch_sh)
    if done % c.log_every == 0 or "eval_loss" in rec or done == last:
      metrics.write(rec)
    if bar is not None:
      bar.set_postfix(loss=f"{loss_f:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                      rss=f"{rec['peak_rss_bytes'] / 2**30:.2f}G", refresh=False)
      bar.update(1)
    if (c.save_every and done % c.save_every == 0) or done == last:
      manager.save(done, adapter, opt_state, {
          "step": done, "position": list(batches.position), "seed": c.seed,
          "batch_size": c.batch_size, "grad_accum": c.grad_accum, "seq_len": c.seq_len,
          "rows": int(len(train_rows.rows["input_ids"]))})
  if bar is not None:
    bar.close()
  manager.close()
  seconds = time.perf_counter() - t0
  result = {"losses": losses, "eval_losses": eval_losses, "output_dir": str(out),
            "steps": last, "resumed_from": start_step, "seconds": seconds,
            "tokens_per_s": tokens_done / max(seconds, 1e-9),
            "peak_rss_bytes": peak_rss_bytes(), "adapter_dir": None}
  if last == c.max_steps:
    params = lj.combine(jax.device_get(adapter), jax.device_get(frozen))
    result.update(write_outputs(c, model_config, params, out))
    plot_losses(metrics.read(), out / "loss.png")
  return result


def evaluate(eval_fn, adapter, frozen, rows, c: TrainConfig, batch_sh) -> float:
  """Mean loss per target token over the eval rows (batches in order; the last one
  padded with rows of weight 0)."""
  n = len(rows["input_ids"])
  B = c.batch_size
  limit = n if c.eval_batches is None else min(n, c.eval_batches * B)
  total = count = 0.0
  for i in range(0, limit, B):
    batch = {k: v[i:i + B] for k, v in rows.items()}
    short = B - len(batch["input_ids"])
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    s, m = eval_fn(adapter, frozen, jax.device_put(batch, NamedSharding(
        batch_sh.mesh, P(("data", "fsdp"), None))))
    total, count = total + float(s), count + float(m)
  return total / max(count, 1.0)


def write_outputs(c: TrainConfig, config, params, out: pathlib.Path) -> dict:
  """The PEFT adapter, and the merged / folded checkpoints the config asks for."""
  import quantization as qz
  res = {}
  save = params
  if c.lora.init in ("pissa", "olora"):
    # the base was made the residual; PEFT users load the adapter onto the original
    save = lj.to_standard_lora(params)
  lj.save_adapter(out / "adapter", save, lora_config(c), config=config,
                  base_model_name_or_path=str(c.base_model))
  res["adapter_dir"] = str(out / "adapter")
  if c.save_merged:
    models.save_hf(out / "merged", config, lj.merge(params), dequantize=True)
    _copy_tokenizer(c.base_model, out / "merged")
    res["merged_dir"] = str(out / "merged")
  if c.fold_qalora:
    folded = qz.fold_qalora(params, integer_zero_points=True)
    models.save_hf(out / "folded_int4", config, folded)
    _copy_tokenizer(c.base_model, out / "folded_int4")
    res["folded_dir"] = str(out / "folded_int4")
  return res


def _copy_tokenizer(src: str, dst: pathlib.Path) -> None:
  for name in TOKENIZER_FILES:
    try:
      f = ckio.inside(pathlib.Path(src), name, str(src))
    except (FileNotFoundError, ValueError):
      continue
    if f.is_file():
      shutil.copyfile(f, dst / name)


__all__ = ["train", "load_base", "add_adapter", "lora_config", "make_mesh", "param_spec",
           "make_optimizer", "make_train_step", "loss_terms", "evaluate", "write_outputs"]
