"""One training step of a transformer, four ways, measured side by side in one run.

  (a) full fine-tuning: grad of every parameter, adamw over all of them;
  (b) LoRA through `lj.implicit` (factored: x @ W + s (x @ A) @ B);
  (c) LoRA through `lj.merge` (materialized W + s A @ B inside the step);
  (d) quax's LoRA (`quax.examples.lora.LoraArray` + `quax.quaxify`), if it imports;
  (e) the floor of any LoRA step on this function: only the RMSNorm scales trained, so
      the forward and every activation gradient run, but no LoRA work at all.

Prints median step time, XLA's compiled peak-memory estimate (arguments + temporaries
+ outputs), optimizer-state bytes, and the ratios. Also prints the FLOP-count estimate
for (b)/(a): a LoRA step needs the forward (2PT) and the activation gradients (2PT)
but no weight gradients (2PT), so by FLOPs it costs ~4/6 of a full step (the
optimizer update and the embedding gradient of (a) are extra, so the measured ratio may
beat the estimate).

    python benchmarks/lora_step.py            # d_model 512, 4 layers, 8 x 256 tokens
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj


def init_params(key, vocab, d, layers, ff):
  ks = iter(jax.random.split(key, 4 + 6 * layers))
  n = lambda shape, fan: jax.random.normal(next(ks), shape) / np.sqrt(fan)  # noqa: E731
  return {
      "embed": n((vocab, d), 1.0) * 0.02,
      "layers": [{"q_proj": n((d, d), d), "k_proj": n((d, d), d), "v_proj": n((d, d), d),
                  "o_proj": n((d, d), d), "up_proj": n((d, ff), d), "down_proj": n((ff, d), ff),
                  "norm1": jnp.ones(d), "norm2": jnp.ones(d)} for _ in range(layers)],
      "head": n((d, vocab), d),
  }


def rms(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def forward(params, ids, heads):
  x = params["embed"][ids]
  b, t, d = x.shape
  hd = d // heads
  mask = jnp.tril(jnp.ones((t, t), bool))
  for layer in params["layers"]:
    h = rms(x, layer["norm1"])
    q = (h @ layer["q_proj"]).reshape(b, t, heads, hd)
    k = (h @ layer["k_proj"]).reshape(b, t, heads, hd)
    v = (h @ layer["v_proj"]).reshape(b, t, heads, hd)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
    a = jax.nn.softmax(jnp.where(mask, s, -1e9), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
    x = x + o @ layer["o_proj"]
    h = rms(x, layer["norm2"])
    x = x + jax.nn.silu(h @ layer["up_proj"]) @ layer["down_proj"]
  return rms(x, 1.0) @ params["head"]


def xent(logits, ids):
  lp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class Runner:
  """A compiled step with its (donated) state; steps are interleaved across variants
  so that load from other processes falls on all of them alike."""

  def __init__(self, step, state, frozen, ids):
    self.compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, ids).compile()
    mem = self.compiled.memory_analysis()
    self.peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                 + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    self.state, self.frozen, self.ids, self.times = state, frozen, ids, []
    for _ in range(2):  # warm up
      self.run(record=False)

  def run(self, record=True):
    t0 = time.perf_counter()
    self.state, self.loss = self.compiled(self.state, self.frozen, self.ids)
    jax.block_until_ready((self.state, self.loss))
    if record:
      self.times.append(time.perf_counter() - t0)

  @property
  def median(self):
    return statistics.median(self.times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--targets", default="q|v",
                  help="regex alternation of projections to adapt; PEFT's Llama default is "
                       "q|v, all linear layers is q|k|v|o|up|down")
  args = ap.parse_args()
  d, heads = args.d_model, args.heads
  key = jax.random.key(0)
  base = init_params(key, args.vocab, d, args.layers, 4 * d)
  ids = jax.random.randint(key, (args.batch, args.seq), 0, args.vocab)
  cfg = lj.LoraConfig(rank=args.rank, alpha=2 * args.rank,
                      targets=rf"layers/\d+/({args.targets})_proj")
  opt = optax.adamw(1e-4)
  fwd = lambda p, i: forward(p, i, heads)  # noqa: E731
  print(f"transformer d_model={d} layers={args.layers} heads={heads} tokens/step="
        f"{args.batch * args.seq} rank={args.rank}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({jax.device_count()} devices); targets {args.targets}")

  # (a) full fine-tuning
  def full_step(state, _, ids):
    p, o = state
    loss, g = jax.value_and_grad(lambda q: xent(fwd(q, ids), ids))(p)
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  full_state = (jax.tree.map(jnp.copy, base), opt.init(base))
  runners = {"full": Runner(full_step, full_state, None, ids)}
  opt_bytes = {"full": nbytes(full_state[1])}

  # (b), (c) LoRA: the adapter is the only state that changes.
  lora = lj.init(key, base, cfg)
  adapter, frozen = lj.split(lora)

  def lora_step(fn):
    def step(state, frozen, ids):
      ad, o = state
      loss, g = jax.value_and_grad(lambda a: xent(fn(lj.combine(a, frozen), ids), ids))(ad)
      u, o = opt.update(g, o, ad)
      return (optax.apply_updates(ad, u), o), loss
    return step

  ostate = opt.init(adapter)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (state is donated)
  runners["implicit"] = Runner(lora_step(lj.implicit(fwd)), (copy(adapter), ostate), frozen, ids)
  runners["merge"] = Runner(lora_step(lambda p, i: fwd(lj.merge(p), i)),
                            (copy(adapter), opt.init(adapter)), frozen, ids)
  opt_bytes["implicit"] = opt_bytes["merge"] = nbytes(ostate)

  # (d) quax's LoRA on the same function.
  try:
    import equinox as eqx
    import quax
    from quax.examples.lora import LoraArray
    qkeys = iter(jax.random.split(key, 64))
    qparams = jax.tree.map(lambda x: x, base)
    for layer in qparams["layers"]:
      for name in (f"{t}_proj" for t in args.targets.split("|")):
        layer[name] = LoraArray(layer[name], rank=args.rank, key=next(qkeys))
    is_lora = lambda x: isinstance(x, LoraArray)  # noqa: E731
    q_train = jax.tree.map(lambda x: eqx.tree_at(lambda y: y._w, x, replace=None)
                           if is_lora(x) else None, qparams, is_leaf=is_lora)
    q_frozen = jax.tree.map(lambda x: eqx.tree_at(lambda y: (y.a, y.b), x, replace=(None, None))
                            if is_lora(x) else x, qparams, is_leaf=is_lora)
    qfwd = quax.quaxify(fwd)

    def quax_step(state, q_frozen, ids):
      ad, o = state
      def loss_fn(a):
        p = eqx.combine(a, q_frozen)
        return xent(qfwd(p, ids), ids)
      loss, g = jax.value_and_grad(loss_fn)(ad)
      u, o = opt.update(g, o, ad)
      return (optax.apply_updates(ad, u), o), loss

    qo = opt.init(q_train)
    runners["quax"] = Runner(quax_step, (q_train, qo), q_frozen, ids)
    opt_bytes["quax"] = nbytes(qo)
  except Exception as e:  # report, don't hide: quax is optional
    print(f"quax LoRA not measured: {type(e).__name__}: {e}")

  # (e) the floor of any LoRA step on this function: train only the RMSNorm scales.
  # That needs the forward and the activation gradients through every layer (as LoRA
  # does) but no weight gradient of any matrix and no low-rank work at all.
  norms = [{k: v for k, v in layer.items() if k.startswith("norm")} for layer in base["layers"]]
  rest = {**base, "layers": [{k: v for k, v in layer.items() if not k.startswith("norm")}
                             for layer in base["layers"]]}

  def floor_step(state, rest, ids):
    n, o = state
    def loss_fn(n):
      p = {**rest, "layers": [{**lr, **ln} for lr, ln in zip(rest["layers"], n)]}
      return xent(fwd(p, ids), ids)
    loss, g = jax.value_and_grad(loss_fn)(n)
    u, o = opt.update(g, o, n)
    return (optax.apply_updates(n, u), o), loss

  runners["floor"] = Runner(floor_step, (copy(norms), opt.init(norms)), rest, ids)
  opt_bytes["floor"] = nbytes(opt.init(norms))

  for _ in range(args.reps):
    for r in runners.values():
      r.run()
  res = {k: (r.median, r.peak, float(r.loss), opt_bytes[k]) for k, r in runners.items()}

  print(f"\n{'variant':<22}{'step s':>10}{'peak MB':>12}{'opt-state MB':>15}{'loss':>10}")
  names = {"full": "(a) full fine-tune", "implicit": "(b) LoRA implicit",
           "merge": "(c) LoRA merge", "quax": "(d) quax LoRA",
           "floor": "(e) floor: norms only"}
  for k, (t, peak, loss, ob) in res.items():
    print(f"{names[k]:<22}{t:>10.3f}{peak / 2**20:>12.1f}{ob / 2**20:>15.3f}{loss:>10.4f}")
  ft, fp, _, fo = res["full"]
  it, ip, _, io = res["implicit"]
  print("\nratios")
  saved = (1 - it / ft) / (1 - 4 / 6)
  print(f"  step time (b)/(a)      = {it / ft:.3f}   target <= 0.75; FLOP estimate 4/6 = 0.667 "
        f"(no weight gradients): {saved:.0%} of the attainable saving")
  n_ad = sum(x.size for x in jax.tree.leaves(adapter))
  n_all = sum(x.size for x in jax.tree.leaves(base))
  print(f"  opt-state (b)/(a)      = {io / fo:.4f}  target <= 0.02; exact floor = adapter/all "
        f"params = {n_ad:,}/{n_all:,} = {n_ad / n_all:.4f} (adam keeps 2 moments of each)")
  print(f"  peak mem  (b)/(a)      = {ip / fp:.3f}")
  mt, mp, _, _ = res["merge"]
  print(f"  step time (b)/(c)      = {it / mt:.3f}   peak mem (b)/(c) = {ip / mp:.3f}")
  et = res["floor"][0]
  print(f"  step time (b)/(e)      = {it / et:.3f}   (e) has the same forward and activation "
        "gradients and no LoRA work: no LoRA step on this function can beat it")
  if "quax" in res:
    qt, qp, _, _ = res["quax"]
    print(f"  step time ours/quax    = {it / qt:.3f}   target <= 0.8; peak mem ours/quax = "
          f"{ip / qp:.3f}")
    print(f"  floor/quax             = {et / qt:.3f}   so ours/quax cannot go below this here"
          + ("; the 0.8 target lies below that floor" if et / qt > 0.8 else ""))
  # FLOP limit: the matmuls of (b) at the best f32 matmul rate measured here.
  x = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(x).block_until_ready()
  best = min(_timed(lambda: mm(x).block_until_ready()) for _ in range(5))
  rate = 2 * 2048 ** 3 / best
  T, L, ff, V = args.batch * args.seq, args.layers, 4 * d, args.vocab
  lin = L * (4 * d * d + 2 * d * ff) + d * V
  attn = L * 2 * args.seq * d
  need = 2 * T * (lin + attn) + 2 * T * (lin + 2 * attn)   # forward + activation gradients
  print(f"  physical limit: (b) needs >= {need / 1e9:.0f} GFLOP of matmul; best f32 matmul "
        f"rate here {rate / 1e9:.0f} GFLOP/s -> >= {need / rate:.2f} s; (b) takes {it:.2f} s "
        f"({need / rate / it:.0%} of the limit), the floor (e) {et:.2f} s")


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


if __name__ == "__main__":
  main()
