"""Which quantized LoRA wins: held-out quality of the DEPLOYED model, at 4 and 3 bits.

1. Pretrain a small Llama (`lora_jax.models.llama`, nothing downloaded) in full on a
   synthetic language A: an order-2 Markov chain over `vocab` tokens (next-token logits
   `3 * N(0, 1)` per 2-token context), so the model has to store a table of
   `vocab^2` distributions in its weights and quantization noise costs loss.
2. The fine-tuning task is a dialect B of A: half of the 2-token contexts (a fixed random
   half) keep A's next-token distribution, the other half get new ones. Part of the
   task is knowledge the base holds (which quantization damages), part is new.
3. Fine-tune every method with the same LoRA rank, alpha, steps, learning rate, batch
   and optimizer (`optax.adamw`), on the seven projection kernels of every layer
   (embeddings, norms and lm_head stay float32 and frozen, as in QLoRA):

   float LoRA     float32 base, merged after training (the unquantized reference)
   QA-LoRA float  QA-LoRA's group-pooled adapter on the float32 base, merged: a
                  control that separates the pooled adapter's capacity from quantization
   QLoRA          NF4 base (block 64, double quant) + adapter, deployed unmerged (the
                  kernels dequantized on the fly); at 3 bits NF4 has no form, so the
                  base is int3 group-wise round-to-nearest (RTN)
   QLoRA->RTN     the 4-bit NF4 QLoRA, merged (`lj.merge`) and re-quantized RTN
                  (`qz.quantize`, int4/int3 groups of G with zero points)
   QLoRA->GPTQ    the same merged model quantized with `qz.gptq`
   QA-LoRA        `LoraConfig(use_qalora=True, qalora_group_size=G)` over the GPTQ
                  int4/int3 base, folded with `qz.fold_qalora` (float32 zero points:
                  exact; int8 zero points: what GPTQ kernels store)
   IR-QLoRA       `QuantConfig("nf4", icq=True)` base + `LoraConfig(use_iec=True)`
                  adapter, deployed unmerged (4 bits only: ICQ is defined over NF4)
   LoftQ          `qz.loftq` (NF4 at 4 bits, int3 groups at 3 bits), deployed unmerged
   ModuLoRA       LoRA over the GPTQ int4/int3 base, deployed unmerged

   GPTQ (of the bases and of the merged QLoRA model) is calibrated on language A (the
   "generic corpus"; the base is quantized before the task is known).
4. Per row: held-out cross-entropy and next-token accuracy of the deployed model on B
   (targets from position 2 on, where the order-2 chain is defined), the loss of the
   model the method starts fine-tuning from, the deployed bytes (every array of the
   deployed tree: packed codes, scales, zero points, adapter factors, embeddings), and
   the training step time (median after warm-up; all methods' steps interleaved, one
   step each in turn, so machine load falls on all alike).
5. Seeds 0, 1, 2 drive the adapter initialisation and the order of the training data
   (the same pretrained base and held-out set); each row prints the mean and
   [min, max] over seeds, and the claims are checked on per-seed paired differences.

    .venv/bin/python benchmarks/quantized_lora_quality.py            (~15 min, 2 cores)
    .venv/bin/python benchmarks/quantized_lora_quality.py --quick    (seconds)
    options: --seeds 0,1,2 --steps N --bits 4,3 --pretrain-steps N
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
import quantization as qz
from lora_jax.models import llama

TARGETS = r"layers/\d+/(self_attn|mlp)/\w+_proj/kernel"


@dataclasses.dataclass(frozen=True)
class Setup:
  vocab: int = 64
  hidden: int = 128
  intermediate: int = 512
  layers: int = 2
  heads: int = 4
  seq: int = 32
  pretrain_batch: int = 32
  pretrain_steps: int = 1200
  pretrain_lr: float = 3e-3
  batch: int = 16
  steps: int = 300
  lr: float = 3e-3
  rank: int = 4             # QA-LoRA's a is (in / group, r): 128 / 32 = 4 rows
  alpha: float = 8.0
  group: int = 32            # int4/int3 group size, = QA-LoRA's L
  nf4_block: int = 64        # QLoRA's
  calib_batches: int = 4
  calib_batch: int = 16
  held_out: int = 256        # held-out sequences of B
  logit_scale: float = 3.0
  kept: float = 0.5          # fraction of contexts where B keeps A's distribution


FULL = Setup()
QUICK = Setup(vocab=32, hidden=64, intermediate=128, layers=1, heads=2, seq=16,
              pretrain_batch=16, pretrain_steps=60, batch=8, steps=6, calib_batches=1,
              calib_batch=8, held_out=32, rank=2, alpha=4.0)


# ----------------------------------------------------------------------------
# the languages

def languages(s: Setup):
  """Logit tables (vocab, vocab, vocab) of A (pretraining) and B (fine-tuning)."""
  ka, kb, km = jax.random.split(jax.random.PRNGKey(1234), 3)
  la = s.logit_scale * jax.random.normal(ka, (s.vocab,) * 3)
  fresh = s.logit_scale * jax.random.normal(kb, (s.vocab,) * 3)
  keep = jax.random.bernoulli(km, s.kept, (s.vocab, s.vocab, 1))
  return la, jnp.where(keep, la, fresh)


def sample(key, table, batch: int, seq: int):
  """(batch, seq) token ids from the order-2 chain with next-token logits `table`."""
  v = table.shape[0]
  k0, k1, k2 = jax.random.split(key, 3)
  t0 = jax.random.randint(k0, (batch,), 0, v)
  t1 = jax.random.randint(k1, (batch,), 0, v)

  def step(carry, k):
    a, b = carry
    n = jax.random.categorical(k, table[a, b])
    return (b, n), n

  _, rest = jax.lax.scan(step, (t0, t1), jax.random.split(k2, seq - 2))
  return jnp.concatenate([t0[:, None], t1[:, None], rest.T], axis=1)


def oracle_loss(table, ids) -> float:
  """Cross-entropy of the true chain on `ids` (the floor any model can reach)."""
  lp = jax.nn.log_softmax(table[ids[:, :-2], ids[:, 1:-1]], axis=-1)
  return float(-jnp.mean(jnp.take_along_axis(lp, ids[:, 2:, None], axis=-1)))


# ----------------------------------------------------------------------------
# model, losses, steps

def model_config(s: Setup) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden,
                           intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                           num_attention_heads=s.heads, num_key_value_heads=s.heads,
                           max_position_embeddings=s.seq)


def xent_acc(logits, ids):
  """Loss and next-token accuracy on targets 2.. (logits of ids[:, :-1])."""
  lg, y = logits[:, 1:], ids[:, 2:]
  loss = optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
  acc = jnp.mean((jnp.argmax(lg, axis=-1) == y).astype(jnp.float32))
  return loss, acc


def make_fns(config, s: Setup):
  fwd = lj.implicit(llama.forward)
  opt = optax.adamw(s.lr)

  @jax.jit
  def evaluate(params, ids):
    return xent_acc(fwd(params, config, ids[:, :-1]), ids)

  @jax.jit
  def train_step(adapter, opt_state, frozen, table, key):
    ids = sample(key, table, s.batch, s.seq)

    def loss_fn(a):
      return xent_acc(fwd(lj.combine(a, frozen), config, ids[:, :-1]), ids)[0]

    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  return evaluate, train_step, opt


def pretrain(config, s: Setup, table, log=print):
  params = llama.init_params(jax.random.PRNGKey(0), config)
  sched = optax.warmup_cosine_decay_schedule(0.0, s.pretrain_lr, max(1, s.pretrain_steps // 20),
                                             s.pretrain_steps, s.pretrain_lr / 10)
  opt = optax.adamw(sched, weight_decay=0.0)

  @jax.jit
  def step(p, st, key):
    ids = sample(key, table, s.pretrain_batch, s.seq)
    loss, g = jax.value_and_grad(lambda q: xent_acc(llama.forward(q, config, ids[:, :-1]),
                                                    ids)[0])(p)
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st, loss

  st = opt.init(params)
  for i in range(s.pretrain_steps):
    params, st, loss = step(params, st, jax.random.PRNGKey(10_000 + i))
    if i % max(1, s.pretrain_steps // 6) == 0 or i == s.pretrain_steps - 1:
      log(f"  pretrain step {i:5d}  loss {float(loss):.4f}")
  return params


def tree_bytes(tree: Any) -> int:
  """Bytes of every array of `tree` (implicit leaves count their children: packed codes,
  scales, zero points, adapter factors)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


# ----------------------------------------------------------------------------
# the methods

def irqlora_configs(s: Setup):
  """(QuantConfig with icq, LoraConfig with use_iec), or None when this checkout has no
  IR-QLoRA (the names are the design contract's)."""
  try:
    qc = qz.QuantConfig(format="nf4", block_size=s.nf4_block, icq=True, targets=TARGETS)
    lc = lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=TARGETS, use_iec=True)
  except TypeError:
    return None
  return qc, lc


@dataclasses.dataclass
class Trainer:
  """One method's training run: `build(key)` gives the initial LoRA tree."""
  name: str
  build: Callable[[jax.Array], Any]


@dataclasses.dataclass
class Row:
  """One table row: deploys `trainer`'s trained tree with `deploy` (None: n/a)."""
  bits: str
  method: str
  form: str
  trainer: str | None
  deploy: Callable[[Any], Any] | None = None
  reason: str = ""


def methods(s: Setup, config, base, bits: list[int], calib, log=print):
  """The trainers and rows for `bits`. GPTQ'd bases are built here (seed-independent)."""
  lcfg = lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=TARGETS)
  nf4 = qz.QuantConfig("nf4", s.nf4_block, double_quant=True, targets=TARGETS)
  grp = {b: qz.QuantConfig(f"int{b}", s.group, symmetric=False, targets=TARGETS) for b in bits}
  gfwd = lambda p, ids: llama.forward(p, config, ids)  # noqa: E731
  gptq_base = {}
  for b in bits:
    t0 = time.perf_counter()
    gptq_base[b] = qz.gptq(base, gfwd, calib, grp[b], progress=False)
    log(f"  GPTQ int{b} g{s.group} base: {time.perf_counter() - t0:.1f} s")

  def init_on(qbase, cfg=lcfg):
    return lambda key: lj.init(key, qbase, cfg)

  def merged(tr):
    return lj.merge(qz.dequantize(tr))

  def requant_gptq(cfg):
    return lambda tr: qz.gptq(merged(tr), gfwd, calib, cfg, progress=False)

  qa_cfg = lj.LoraConfig(rank=s.rank, alpha=s.alpha, targets=TARGETS, use_qalora=True,
                         qalora_group_size=s.group)
  trainers = [Trainer("float", init_on(base)),
              Trainer("qalora_float", init_on(base, qa_cfg)),
              Trainer("qlora4", init_on(qz.quantize(base, nf4)))]
  rows = [Row("32", "float LoRA", "float32, merged", "float", lambda tr: lj.merge(tr)),
          Row("32", "QA-LoRA, float base (control)", "float32, merged", "qalora_float",
              lambda tr: lj.merge(tr))]
  ir = irqlora_configs(s)
  for b in bits:
    B = str(b)
    if b == 4:
      rows.append(Row(B, "QLoRA", f"NF4 b{s.nf4_block} dq + adapter", "qlora4", lambda tr: tr))
    else:
      trainers.append(Trainer(f"qlora{b}", init_on(qz.quantize(base, grp[b]))))
      rows.append(Row(B, "QLoRA", f"int{b} g{s.group} RTN + adapter (no NF{b})", f"qlora{b}",
                      lambda tr: tr))
    rows.append(Row(B, "QLoRA -> merge -> RTN", f"int{b} g{s.group}", "qlora4",
                    lambda tr, c=grp[b]: qz.quantize(merged(tr), c)))
    rows.append(Row(B, "QLoRA -> merge -> GPTQ", f"int{b} g{s.group}", "qlora4",
                    requant_gptq(grp[b])))
    trainers.append(Trainer(f"qalora{b}", init_on(gptq_base[b], qa_cfg)))
    rows.append(Row(B, "QA-LoRA (GPTQ base), folded", f"int{b} g{s.group}, f32 zeros",
                    f"qalora{b}", qz.fold_qalora))
    rows.append(Row(B, "QA-LoRA (GPTQ base), folded", f"int{b} g{s.group}, int8 zeros",
                    f"qalora{b}", lambda tr: qz.fold_qalora(tr, integer_zero_points=True)))
    if ir is None:
      rows.append(Row(B, "IR-QLoRA (ICQ + IEC)", "", None,
                      reason="IR-QLoRA: not in this checkout"))
    elif b == 4:
      qc, lc = ir
      trainers.append(Trainer("irqlora4", init_on(qz.quantize(base, qc), lc)))
      rows.append(Row(B, "IR-QLoRA (ICQ + IEC)", f"ICQ-NF4 b{s.nf4_block} + adapter",
                      "irqlora4", lambda tr: tr))
    else:
      rows.append(Row(B, "IR-QLoRA (ICQ + IEC)", "", None,
                      reason=f"n/a: ICQ is an NF4 method, NF4 has no {b}-bit form"))
    lq_cfg = nf4 if b == 4 else grp[b]
    trainers.append(Trainer(f"loftq{b}", lambda key, c=lq_cfg: qz.loftq(key, base, lcfg, c)))
    rows.append(Row(B, "LoftQ", (f"NF4 b{s.nf4_block} dq" if b == 4 else
                                 f"int{b} g{s.group} RTN") + " + adapter", f"loftq{b}",
                    lambda tr: tr))
    trainers.append(Trainer(f"modulora{b}", init_on(gptq_base[b])))
    rows.append(Row(B, "ModuLoRA", f"GPTQ int{b} g{s.group} + adapter", f"modulora{b}",
                    lambda tr: tr))
  return trainers, rows, gptq_base


# ----------------------------------------------------------------------------
# the run

def fmt(xs, digits=4, scale=1.0):
  xs = [x * scale for x in xs]
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f}"
  return f"{statistics.mean(xs):.{digits}f} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


def run(s: Setup, seeds: list[int], bits: list[int], log=print) -> dict:
  t_start = time.perf_counter()
  config = model_config(s)
  table_a, table_b = languages(s)
  held = sample(jax.random.PRNGKey(999), table_b, s.held_out, s.seq)
  held_a = sample(jax.random.PRNGKey(998), table_a, s.held_out, s.seq)
  calib = [sample(jax.random.PRNGKey(50 + i), table_a, s.calib_batch, s.seq)
           for i in range(s.calib_batches)]
  evaluate, train_step, opt = make_fns(config, s)

  log(f"pretraining on language A ({s.pretrain_steps} steps)")
  t0 = time.perf_counter()
  base = pretrain(config, s, table_a, log)
  t_pre = time.perf_counter() - t0
  context = {"oracle_a": oracle_loss(table_a, held_a), "oracle_b": oracle_loss(table_b, held),
             "base_a": float(evaluate(base, held_a)[0]), "base_b": float(evaluate(base, held)[0]),
             "pretrain_s": t_pre}
  log(f"  {t_pre:.0f} s; base loss on A {context['base_a']:.4f} (chain's own "
      f"{context['oracle_a']:.4f}), on B {context['base_b']:.4f} (chain's own "
      f"{context['oracle_b']:.4f})")

  trainers, rows, gptq_base = methods(s, config, base, bits, calib, log)
  # how much quantizing the pretrained base costs, before any fine-tuning (on A)
  quant_a = {}
  for b in bits:
    q_rtn = qz.quantize(base, qz.QuantConfig(f"int{b}", s.group, symmetric=False,
                                             targets=TARGETS))
    quant_a[f"int{b} g{s.group} RTN"] = float(evaluate(q_rtn, held_a)[0])
    quant_a[f"int{b} g{s.group} GPTQ"] = float(evaluate(gptq_base[b], held_a)[0])
  quant_a[f"NF4 b{s.nf4_block}"] = float(evaluate(
      qz.quantize(base, qz.QuantConfig("nf4", s.nf4_block, targets=TARGETS)), held_a)[0])
  log("  quantized base, loss on A: " + ", ".join(f"{k} {v:.4f}" for k, v in quant_a.items()))
  context["quant_a"] = quant_a

  by_name = {t.name: t for t in trainers}
  used = [t for t in trainers if any(r.trainer == t.name for r in rows)]
  start_loss = {t.name: [] for t in used}
  n_adapter = {}
  times = {t.name: [] for t in used}
  trained_loss = {t.name: [] for t in used}
  results = {id(r): {"loss": [], "acc": [], "bytes": []} for r in rows}
  for seed in seeds:
    log(f"seed {seed}: fine-tuning {len(used)} runs on language B, {s.steps} steps, "
        "interleaved")
    key = jax.random.PRNGKey(seed)
    data = jax.random.PRNGKey(1_000 + seed)
    states = {}
    t_seed = time.perf_counter()
    for t in used:
      params = by_name[t.name].build(key)
      start_loss[t.name].append(float(evaluate(params, held)[0]))
      adapter, frozen = lj.split(params)
      n_adapter[t.name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter))
      states[t.name] = [adapter, opt.init(adapter), frozen]
    for step in range(s.steps):
      k = jax.random.fold_in(data, step)
      for t in used:
        st = states[t.name]
        t0 = time.perf_counter()
        st[0], st[1], loss = train_step(st[0], st[1], st[2], table_b, k)
        jax.block_until_ready(loss)
        if step >= 2:                       # step 0 compiles, step 1 warms up
          times[t.name].append(time.perf_counter() - t0)
    t_train = time.perf_counter()
    for t in used:
      adapter, _, frozen = states[t.name]
      trained = lj.combine(adapter, frozen)
      trained_loss[t.name].append(float(evaluate(trained, held)[0]))
      for r in rows:
        if r.trainer != t.name:
          continue
        deployed = r.deploy(trained)
        loss, acc = evaluate(deployed, held)
        res = results[id(r)]
        res["loss"].append(float(loss))
        res["acc"].append(float(acc))
        res["bytes"].append(tree_bytes(deployed))
    log("  trained (undeployed) loss: " + ", ".join(
        f"{t.name} {trained_loss[t.name][-1]:.4f}" for t in used))
    log(f"  init + training {t_train - t_seed:.0f} s, deploying + evaluating "
        f"{time.perf_counter() - t_train:.0f} s")

  table = []
  for r in rows:
    res = results[id(r)]
    entry = {"bits": r.bits, "method": r.method, "form": r.form, "reason": r.reason,
             "loss": res["loss"], "acc": res["acc"], "bytes": res["bytes"],
             "start": start_loss.get(r.trainer, []), "step_ms": None,
             "adapter_params": n_adapter.get(r.trainer)}
    if r.trainer is not None and times[r.trainer]:
      entry["step_ms"] = 1e3 * statistics.median(times[r.trainer])
    table.append(entry)
  return {"setup": s, "seeds": seeds, "bits": bits, "context": context, "rows": table,
          "seconds": time.perf_counter() - t_start}


def markdown(out: dict) -> str:
  lines = ["| bits | method | deployed as | held-out loss | next-token acc | loss before FT "
           "| deployed KiB | adapter params | step ms |", "|---|---|---|---|---|---|---|---|---|"]
  for e in out["rows"]:
    if not e["loss"]:
      lines.append(f"| {e['bits']} | {e['method']} | {e['reason']} | | | | | | |")
      continue
    kib = statistics.mean(e["bytes"]) / 1024
    ms = f"{e['step_ms']:.1f}" if e["step_ms"] is not None else ""
    lines.append(f"| {e['bits']} | {e['method']} | {e['form']} | {fmt(e['loss'])} | "
                 f"{fmt(e['acc'], 3)} | {fmt(e['start'])} | {kib:.1f} | {e['adapter_params']:,} | "
                 f"{ms} |")
  return "\n".join(lines)


def _find(out, method, bits, form=None):
  for e in out["rows"]:
    if e["method"] == method and e["bits"] == str(bits) and (form is None or form in e["form"]):
      return e if e["loss"] else None
  return None


def _paired(x, y) -> str:
  d = [a - b for a, b in zip(x["loss"], y["loss"])]
  wins = sum(v < 0 for v in d)
  return f"{statistics.mean(d):+.4f} nats (lower in {wins}/{len(d)} seeds)"


def claims(out: dict) -> str:
  """The papers' claims, read off the table (paired per-seed differences)."""
  lines = []
  for b in out["bits"]:
    qa = _find(out, "QA-LoRA (GPTQ base), folded", b, "int8 zeros")
    qaf = _find(out, "QA-LoRA (GPTQ base), folded", b, "f32 zeros")
    rtn, gq = _find(out, "QLoRA -> merge -> RTN", b), _find(out, "QLoRA -> merge -> GPTQ", b)
    if qa and rtn and gq:
      best = min((rtn, gq), key=lambda e: statistics.mean(e["loss"]))
      beats = all(statistics.mean(q["loss"]) < statistics.mean(p["loss"])
                  for q in (qa, qaf) for p in (rtn, gq))
      lines.append(
          f"- QA-LoRA beats QLoRA + post-training quantization at {b} bits: "
          f"{'yes' if beats else 'no'}. QA-LoRA folded (int8 zeros) - QLoRA->"
          f"{best['method'].split('-> ')[-1]} (the better PTQ): {_paired(qa, best)}; "
          f"(f32 zeros): {_paired(qaf, best)}.")
  ctl, flt = _find(out, "QA-LoRA, float base (control)", 32), _find(out, "float LoRA", 32)
  if ctl and flt:
    lines.append(
        f"- Control: QA-LoRA's pooled adapter on the float base - float LoRA: "
        f"{_paired(ctl, flt)}, with {ctl['adapter_params']:,} vs {flt['adapter_params']:,} "
        f"adapter parameters: the share of QA-LoRA's gap that is its adapter's capacity "
        f"(a has in / {out['setup'].group} rows), not quantization.")
  ir, ql = _find(out, "IR-QLoRA (ICQ + IEC)", 4), _find(out, "QLoRA", 4)
  if ir and ql:
    beats = statistics.mean(ir["loss"]) < statistics.mean(ql["loss"])
    lines.append(f"- IR-QLoRA beats QLoRA at 4 bits: {'yes' if beats else 'no'}: "
                 f"IR-QLoRA - QLoRA {_paired(ir, ql)}.")
  else:
    lines.append("- IR-QLoRA beats QLoRA at 4 bits: not measured (IR-QLoRA is not in this "
                 "checkout); the script checks it once `QuantConfig(icq=True)` and "
                 "`LoraConfig(use_iec=True)` exist.")
  return "\n".join(lines)


def report(out: dict) -> str:
  s, c = out["setup"], out["context"]
  head = (f"Llama {s.layers} layers x {s.hidden} (intermediate {s.intermediate}, vocab "
          f"{s.vocab}), pretrained {s.pretrain_steps} steps on A; LoRA rank {s.rank}, alpha "
          f"{s.alpha:g}, adamw lr {s.lr:g}, {s.steps} steps x batch {s.batch} x seq {s.seq} "
          f"on B; seeds {','.join(map(str, out['seeds']))}: mean [min, max].\n"
          f"Pretrained base: loss on A {c['base_a']:.4f} (the chain's own entropy "
          f"{c['oracle_a']:.4f}); on B before fine-tuning {c['base_b']:.4f} (B's entropy "
          f"{c['oracle_b']:.4f}). Quantized base, loss on A: "
          + ", ".join(f"{k} {v:.4f}" for k, v in c["quant_a"].items()) + ".")
  return (f"{head}\n\n{markdown(out)}\n\n{claims(out)}\n\n"
          f"Total {out['seconds']:.0f} s (pretraining {c['pretrain_s']:.0f} s).")


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="a tiny configuration (seconds)")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--pretrain-steps", type=int, default=None)
  ap.add_argument("--bits", default="4,3")
  args = ap.parse_args(argv)
  s = QUICK if args.quick else FULL
  if args.steps is not None:
    s = dataclasses.replace(s, steps=args.steps)
  if args.pretrain_steps is not None:
    s = dataclasses.replace(s, pretrain_steps=args.pretrain_steps)
  bits = [int(b) for b in args.bits.split(",") if b]
  for b in bits:
    if b not in (3, 4):
      raise SystemExit(f"--bits: {b} is not 4 or 3")
  if s.steps < 3:
    raise SystemExit(f"--steps {s.steps}: at least 3 (two warm-up steps are not timed)")
  seeds = [int(x) for x in args.seeds.split(",") if x]
  out = run(s, seeds, bits)
  print()
  print(report(out))
  sys.stdout.flush()
  return out


if __name__ == "__main__":
  main()
