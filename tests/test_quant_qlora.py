"""QLoRA: LoraWeight(w=QuantizedArray) through lj.init / split / combine / implicit / optax,
equal to the same step on the dequantized base; the codes never get gradients or state."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
import quantization as qz

D, H, V = 64, 96, 50
TARGETS = r".*(gate|up|down)_proj/kernel"


def _init(key, nblocks=2):
  ks = iter(jax.random.split(key, 4 + 3 * nblocks))
  n = lambda shape, s=0.05: jax.random.normal(next(ks), shape) * s
  return {
      "embed": n((V, D), 0.5),
      "blocks": [{"mlp": {"gate_proj": {"kernel": n((D, H))}, "up_proj": {"kernel": n((D, H))},
                          "down_proj": {"kernel": n((H, D))}}, "norm": jnp.ones(D)}
                 for _ in range(nblocks)],
      "lm_head": {"kernel": n((D, V))},
  }


def _rms(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale[None, None]


def _mlp(m, h):
  return (jax.nn.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])) @ \
      m["down_proj"]["kernel"]


def model(p, ids):
  h = p["embed"][ids]
  for blk in p["blocks"]:
    h = h + _mlp(blk["mlp"], _rms(h, blk["norm"]))
  return h @ p["lm_head"]["kernel"]


def loss_fn(p, ids):
  logits = model(p, ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


@functools.cache
def _qlora(seed=0, fmt="nf4"):
  base = _init(jax.random.PRNGKey(seed))
  qbase = qz.quantize(base, qz.QuantConfig(fmt, 32, True, targets=TARGETS))
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, init="gaussian")
  params = lj.init(jax.random.PRNGKey(seed + 1), qbase, cfg)
  # non-zero b so the adapter contributes to the forward and to grad(a)
  params = jax.tree.map(
      lambda x: x.__class__(**{**x.__dict__, "b": jnp.full_like(x.b, 0.01)})
      if isinstance(x, lj.LoraWeight) else x, params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  return params


IDS = jax.random.randint(jax.random.PRNGKey(9), (4, 12), 0, V)


def test_init_on_quantized_tree():
  params = _qlora()
  lw = params["blocks"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(lw, lj.LoraWeight) and isinstance(lw.w, qz.QuantizedArray)
  assert lw.shape == (D, H) and lw.a.shape == (D, 4) and lw.b.shape == (4, H)
  mask = lj.trainable_mask(params)
  m = mask["blocks"][0]["mlp"]["up_proj"]["kernel"]
  assert m.a and m.b and not m.w.codes and not m.w.absmax
  assert isinstance(params["embed"], jax.Array)     # not a target: stays dense


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_qlora_step_equals_dequantized_base(fmt):
  params = _qlora(fmt=fmt)
  adapter, frozen = lj.split(params)
  f = lambda ad, fr: lj.implicit(loss_fn)(lj.combine(ad, fr), IDS)
  loss, grads = jax.jit(jax.value_and_grad(f))(adapter, frozen)

  dense = qz.dequantize(params)                       # same adapter, dequantized base
  d_adapter, d_frozen = lj.split(dense)
  d_loss, d_grads = jax.value_and_grad(f)(d_adapter, d_frozen)
  ref_loss = loss_fn(lj.merge(dense), IDS)
  np.testing.assert_allclose(loss, d_loss, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.leaves(grads), jax.tree.leaves(d_grads),
                              rtol=1e-4, atol=1e-6)
  # gradients exist only for the LoRA factors
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 2 * 3 * 2 and all(x.ndim == 2 and 4 in x.shape for x in leaves)


@pytest.mark.slow
def test_optax_state_only_for_adapter_and_codes_unchanged(standard_promotion):
  params = _qlora()
  adapter, frozen = lj.split(params)
  opt = optax.adam(1e-2)
  state = opt.init(adapter)
  n_adapter = sum(x.size for x in jax.tree.leaves(adapter))
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert n_state == 2 * n_adapter                     # mu and nu, nothing for the codes
  assert not any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state))

  @jax.jit
  def step(adapter, state):
    loss, g = jax.value_and_grad(
        lambda ad: lj.implicit(loss_fn)(lj.combine(ad, frozen), IDS))(adapter)
    upd, state = opt.update(g, state, adapter)
    return optax.apply_updates(adapter, upd), state, loss

  losses = []
  for _ in range(5):
    adapter, state, loss = step(adapter, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  after = lj.combine(adapter, frozen)
  chex.assert_trees_all_equal(
      [x for x in jax.tree.leaves(after) if x.dtype == jnp.uint8],
      [x for x in jax.tree.leaves(params) if x.dtype == jnp.uint8])


def test_quantize_after_lora_init_quantizes_base():
  base = _init(jax.random.PRNGKey(3))
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS)
  params = lj.init(jax.random.PRNGKey(4), base, cfg)
  q = qz.quantize(params, qz.QuantConfig("nf4", 32, True, targets=TARGETS))
  lw = q["blocks"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(lw, lj.LoraWeight) and isinstance(lw.w, qz.QuantizedArray)
  chex.assert_trees_all_equal(lw.a, params["blocks"][1]["mlp"]["down_proj"]["kernel"].a)
  s = qz.summary(q)
  assert "blocks/1/mlp/down_proj/kernel" in s and "nf4" in s


@pytest.mark.slow
def test_qlora_under_scan_with_stacked_layers():
  L = 3
  k = jax.random.split(jax.random.PRNGKey(5), 3)
  base = {"layers": {"up": jax.random.normal(k[0], (L, D, H)) * 0.05,
                     "down": jax.random.normal(k[1], (L, H, D)) * 0.05}}
  x = jax.random.normal(k[2], (4, D))

  def f(p, x):
    def body(h, lp):
      return h + jnp.tanh(h @ lp["up"]) @ lp["down"], None
    return jnp.mean(jax.lax.scan(body, x, p["layers"])[0] ** 2)

  q = qz.quantize(base, qz.QuantConfig("nf4", 32, True))
  assert q["layers"]["up"].shape == (L, D, H) and q["layers"]["up"].offset.shape == (L,)
  cfg = lj.LoraConfig(rank=2, alpha=4, targets=r"layers/.*", layouts={r"layers/.*": "lio"},
                      init="gaussian")
  params = lj.init(jax.random.PRNGKey(6), q, cfg)
  params = jax.tree.map(
      lambda w: w.__class__(**{**w.__dict__, "b": jnp.full_like(w.b, 0.02)})
      if isinstance(w, lj.LoraWeight) else w, params, is_leaf=lambda w: isinstance(w, lj.LoraWeight))
  adapter, frozen = lj.split(params)
  g = jax.grad(lambda ad: lj.implicit(f)(lj.combine(ad, frozen), x))(adapter)
  d_adapter, d_frozen = lj.split(qz.dequantize(params))
  dg = jax.grad(lambda ad: lj.implicit(f)(lj.combine(ad, d_frozen), x))(d_adapter)
  chex.assert_trees_all_close(jax.tree.leaves(g), jax.tree.leaves(dg), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(lj.implicit(f)(params, x), f(lj.merge(qz.dequantize(params)), x),
                             rtol=1e-5)


def test_qlora_matmul_is_one_custom_vjp_and_gradients_of_the_whole_tree_are_safe():
  """A 2-D QLoRA matmul runs as one fused custom_vjp (x @ Wq via the quantized rule,
  plus the low-rank terms); differentiating every float leaf, the quantized base's
  scales included, gives the dense reference's gradients for the factors and exact
  zeros for the base's scales (codes are never trained)."""
  # no double quant: the block absmax are float32 leaves, which grad does reach
  params = qz.quantize(_init(jax.random.PRNGKey(3)), qz.QuantConfig("fp4", 32, False,
                                                                     targets=TARGETS))
  params = lj.init(jax.random.PRNGKey(4), params,
                   lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, init="gaussian"))
  params = jax.tree.map(
      lambda x: x.__class__(**{**x.__dict__, "b": jnp.full_like(x.b, 0.02)})
      if isinstance(x, lj.LoraWeight) else x, params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  jaxpr = str(jax.make_jaxpr(lambda p: lj.implicit(loss_fn)(p, IDS))(params))
  assert jaxpr.count("_lora_matmul_implicit_base") == 6     # 3 kernels x 2 blocks
  g = jax.grad(lambda p: lj.implicit(loss_fn)(p, IDS), allow_int=True)(params)
  dense = lj.merge(qz.dequantize(params))
  lw = params["blocks"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(lw.w, qz.QuantizedArray) and lw.w.absmax.dtype == jnp.float32
  gw = g["blocks"][0]["mlp"]["up_proj"]["kernel"].w
  np.testing.assert_array_equal(np.asarray(gw.absmax), 0.0)
  # factors: same gradient as the step on the dequantized base
  def dense_loss(a, b):
    p = jax.tree.map(lambda x: x, dense)
    p["blocks"][0]["mlp"]["up_proj"]["kernel"] = (
        qz.dequantize(lw.w) + lw.scale * a @ b)
    return loss_fn(p, IDS)
  ga, gb = jax.grad(dense_loss, argnums=(0, 1))(lw.a, lw.b)
  gl = g["blocks"][0]["mlp"]["up_proj"]["kernel"]
  chex.assert_trees_all_close((gl.a, gl.b), (ga, gb), atol=1e-5, rtol=1e-4)
