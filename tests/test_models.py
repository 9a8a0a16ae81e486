"""`implicit` on four kinds of models: a hand-written MLP, a Flax linen transformer
(Embed, DenseGeneral, nn.scan over nn.remat layers, tied output), Flax NNX through
nnx.split / nnx.merge, and Equinox through eqx.partition / eqx.combine. Outputs and
adapter gradients equal the materialized reference, and the factored path is real: no
dot_general builds a LoRA'd kernel's full shape."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import lora_jax as lj
from lora_testing import randomize_b
from jaxpr_walk import dot_output_shapes

KEY = jax.random.key(0)
VOCAB, D, HEADS, LAYERS = 48, 32, 4, 3


def _check_fwd_and_grad(apply, params, *args, atol=1e-4):
  # references jitted too: eager runs scan/remat models op by op, several times slower
  want = jax.jit(lambda p, *a: apply(lj.merge(p), *a))(params, *args)
  got = jax.jit(lj.implicit(apply))(params, *args)
  chex.assert_trees_all_close(got, want, atol=atol, rtol=atol)
  adapter, frozen = lj.split(params)

  def loss(fn, ad):
    return jnp.mean(fn(lj.combine(ad, frozen), *args) ** 2)

  g = jax.jit(jax.grad(lambda ad: loss(lj.implicit(apply), ad)))(adapter)
  g_ref = jax.jit(jax.grad(lambda ad: loss(lambda p, *a: apply(lj.merge(p), *a), ad)))(adapter)
  chex.assert_trees_all_close(g, g_ref, atol=10 * atol, rtol=10 * atol)
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0


def _lora_kernel_shapes(params):
  out = set()
  for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, lj.LoraWeight)):
    if isinstance(x, lj.LoraWeight):
      out.add(tuple(x.shape))
      out.add(tuple(x.shape[x.nbatch:]))
  return out


# --- 1. a hand-written MLP ---------------------------------------------------------

def mlp(params, x):
  for layer in params["layers"]:
    x = jax.nn.gelu(x @ layer["kernel"] + layer["bias"][None])
  return x @ params["head"]


def test_handwritten_mlp():
  ks = jax.random.split(KEY, 4)
  params = {"layers": [{"kernel": jax.random.normal(ks[i], (16, 16)) / 4, "bias": jnp.zeros(16)}
                       for i in range(3)],
            "head": jax.random.normal(ks[3], (16, 4))}
  lp = randomize_b(lj.init(KEY, params, lj.LoraConfig(rank=4, alpha=8, targets=r".*kernel|head")))
  _check_fwd_and_grad(mlp, lp, jax.random.normal(KEY, (8, 16)))


# --- 2. a Flax linen transformer -----------------------------------------------------

class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    hd = D // HEADS
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.DenseGeneral((HEADS, hd), use_bias=False, name="q_proj")(h)
    k = nn.DenseGeneral((HEADS, hd), use_bias=False, name="k_proj")(h)
    v = nn.DenseGeneral((HEADS, hd), use_bias=False, name="v_proj")(h)
    t = x.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o_proj")(o)
    h = nn.RMSNorm(name="mlp_norm")(x)
    x = x + nn.Dense(D, name="down_proj")(jax.nn.silu(nn.Dense(2 * D, name="up_proj")(h)))
    return x, None


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(VOCAB, D, name="embed_tokens")
    x = embed(ids)
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=LAYERS)
    x, _ = stack(name="layers")(x, None)
    return embed.attend(nn.RMSNorm(name="norm")(x))  # tied output projection


LINEN_LAYOUTS = {r".*layers/(q|k|v)_proj/kernel": "lioo", r".*layers/o_proj/kernel": "liio",
                 r".*layers/(up|down)_proj/kernel": "lio"}
LINEN_TARGETS = r".*(q|k|v|o|up|down)_proj/kernel|.*embed_tokens/embedding"


def _linen():
  model = Transformer()
  ids = jax.random.randint(KEY, (2, 10), 0, VOCAB)
  variables = model.init(KEY, ids)
  return model, variables, ids


@pytest.mark.slow
def test_flax_linen_transformer_scan_remat_tied():
  model, variables, ids = _linen()
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=LINEN_TARGETS, layouts=LINEN_LAYOUTS)
  lp = randomize_b(lj.init(KEY, variables, cfg))
  q = lp["params"]["layers"]["q_proj"]["kernel"]
  assert q.shape == (LAYERS, D, HEADS, D // HEADS) and q.a.shape == (LAYERS, D, 4)
  _check_fwd_and_grad(model.apply, lp, ids)


def test_linen_layouts_read_from_the_function():
  model, variables, ids = _linen()
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=LINEN_TARGETS)
  lp = lj.init(KEY, variables, cfg, fn=model.apply, args=(ids,))
  ref = lj.init(KEY, variables, lj.LoraConfig(rank=4, alpha=8, targets=LINEN_TARGETS,
                                              layouts=LINEN_LAYOUTS))
  for path, x in lj.leaves_with_paths(lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight)):
    if isinstance(x, lj.LoraWeight):
      y = dict(lj.leaves_with_paths(ref, is_leaf=lambda x: isinstance(x, lj.LoraWeight)))[path]
      assert (x.axes, x.a.shape, x.b.shape) == (y.axes, y.a.shape, y.b.shape), path


def test_factored_path_is_real_in_the_jaxpr():
  model, variables, ids = _linen()
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=LINEN_TARGETS, layouts=LINEN_LAYOUTS)
  lp = lj.init(KEY, variables, cfg)
  kernels = _lora_kernel_shapes(lp)
  dots = dot_output_shapes(jax.make_jaxpr(lj.implicit(model.apply))(lp, ids))
  assert dots, "no dot_general found"
  assert not kernels & set(dots), f"a dot_general built a LoRA kernel: {kernels & set(dots)}"
  # the same walk on the merged reference does find them (the check can fail)
  merged = jax.make_jaxpr(lambda p, i: model.apply(lj.merge(p), i))(lp, ids)
  assert kernels & set(dot_output_shapes(merged))
  # and the gradient jaxpr stays factored too
  adapter, frozen = lj.split(lp)
  gjaxpr = jax.make_jaxpr(jax.grad(
      lambda ad: jnp.sum(lj.implicit(model.apply)(lj.combine(ad, frozen), ids))))(adapter)
  assert not kernels & set(dot_output_shapes(gjaxpr))


# --- 3. Flax NNX through nnx.split / nnx.merge --------------------------------------

class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def test_flax_nnx_split_merge():
  model = NnxMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  paths = [p for p, _ in lj.leaves_with_paths(state)]
  assert "up/kernel" in paths, paths

  def apply(state, x):
    return nnx.merge(graphdef, state)(x)

  lp = randomize_b(lj.init(KEY, state, lj.LoraConfig(rank=4, alpha=4, targets=r".*/kernel")))
  _check_fwd_and_grad(apply, lp, jax.random.normal(KEY, (5, 16)))


# --- composition: vmap over adapters, NamedSharding ----------------------------------

def test_vmap_over_stacked_adapters():
  params = {"k": jax.random.normal(KEY, (16, 8))}
  lps = [randomize_b(lj.init(jax.random.key(i), params, lj.LoraConfig(rank=2, targets="k")),
                      jax.random.key(10 + i)) for i in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *lps)
  x = jax.random.normal(KEY, (4, 16))
  got = jax.vmap(lj.implicit(lambda p, y: y @ p["k"]), in_axes=(0, None))(stacked, x)
  for i in range(3):
    np.testing.assert_allclose(got[i], x @ lj.merge(lps[i])["k"], rtol=1e-5, atol=1e-5)


def test_named_sharding_inputs_keep_sharding():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  params = {"k": jax.random.normal(KEY, (16, 32))}
  lp = randomize_b(lj.init(KEY, params, lj.LoraConfig(rank=4, targets="k")))
  lw = lp["k"]
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  lw = lj.LoraWeight(w=put(lw.w, PS(None, "model")), a=put(lw.a, PS()),
                     b=put(lw.b, PS(None, "model")), scale=lw.scale, axes=lw.axes)
  x = put(jax.random.normal(KEY, (8, 16)), PS("data", None))
  f = jax.jit(lj.implicit(lambda p, y: y @ p["k"]),
              out_shardings=NamedSharding(mesh, PS("data", "model")))
  y = f({"k": lw}, x)
  np.testing.assert_allclose(y, x @ lj.merge({"k": lw})["k"], rtol=1e-5, atol=1e-5)
  assert y.sharding.spec == PS("data", "model")
  assert len(y.addressable_shards) == 8


# --- Equinox: eqx.partition / eqx.combine --------------------------------------------

def test_equinox_mlp_through_partition_and_combine():
  """Equinox keeps Linear weights as (out, in) and applies `weight @ x` under vmap:
  `init(fn=...)` reads the "oi" layout from the traced dots, and the factored path
  equals the merged one."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(16, 4, 32, depth=2, key=KEY)
  params, static = eqx.partition(model, eqx.is_array)

  def apply(p, x):
    return jax.vmap(eqx.combine(p, static))(x)

  x = jax.random.normal(KEY, (8, 16))
  lp = randomize_b(lj.init(KEY, params, lj.LoraConfig(rank=2, targets=r"layers/\d+/weight"),
                            fn=apply, args=(x,)))
  w0 = lp.layers[0].weight
  assert isinstance(w0, lj.LoraWeight) and w0.axes == "oi"
  assert w0.a.shape == (16, 2) and w0.b.shape == (2, 32)
  _check_fwd_and_grad(apply, lp, x)
  shapes = dot_output_shapes(jax.make_jaxpr(lj.implicit(apply))(lp, x))
  assert not set(shapes) & _lora_kernel_shapes(lp)


@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_packed_segments_equal_separate_sequences(stacked):
  """Two sequences packed in one row (segment ids, positions restarting at 0) give each
  sequence's own logits; padding (segment 0) changes nothing."""
  from lora_jax import models
  cfg = models.DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  params = models.init_params(jax.random.key(0), cfg, stacked=stacked)
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, 50)
  b = jax.random.randint(jax.random.key(2), (1, 7), 0, 50)
  row = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4])
  pos = jnp.asarray([list(range(5)) + list(range(7)) + [0] * 4])
  got = models.forward(params, cfg, row, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(got[:, :5], models.forward(params, cfg, a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 5:12], models.forward(params, cfg, b), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"segment_ids \(1, 3\) must match input_ids \(1, 16\)"):
    models.forward(params, cfg, row, segment_ids=seg[:, :3])


@pytest.mark.parametrize("remat", ["full", "dots_no_batch"])
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_remat_keeps_values_and_gradients(remat, stacked):
  """Activation checkpointing recomputes, it does not change: the LoRA gradients with
  each policy equal those without (through `implicit`), and the remat primitive is in
  the differentiated program."""
  import lora_jax as lj
  from lora_jax import models
  cfg = models.DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  base = models.init_params(jax.random.key(0), cfg, stacked=stacked)
  params = lj.init(jax.random.key(1), base, lj.LoraConfig(
      rank=2, targets="all-linear", layouts=models.decoder.STACKED_LAYOUTS if stacked else {}))
  params = jax.tree.map(lambda x: x.replace_children(b=0.1 * jnp.ones_like(x.b))
                        if isinstance(x, lj.LoraWeight) else x, params,
                        is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  adapter, frozen = lj.split(params)
  ids = jax.random.randint(jax.random.key(2), (2, 9), 0, 50)

  def loss(ad, remat):
    out = lj.implicit(models.forward)(lj.combine(ad, frozen), cfg, ids, remat=remat)
    return jnp.mean(jnp.sin(out))

  want = jax.grad(loss)(adapter, None)
  got = jax.grad(loss)(adapter, remat)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(adapter, remat))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  with pytest.raises(ValueError, match=r"remat='some': expected one of none, full, dots"):
    models.forward(base, cfg, ids, remat="some")


def test_long_causal_attention_runs_in_checkpointed_blocks():
  """From ATTN_FLASH_MIN_TOKENS on, causal attention runs in blocks (flash attention,
  `decoder._flash_attention`): the values and gradients equal one unblocked
  attention's, and the backward pass keeps no (heads, T, T) array."""
  from lora_jax.models import decoder
  cfg = decoder.DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  T = decoder.ATTN_FLASH_MIN_TOKENS + 37        # a partial last block
  q = jax.random.normal(jax.random.key(0), (1, T, 2, 8))
  k, v = (jax.random.normal(jax.random.key(i), (1, T, 1, 8)) for i in (1, 2))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (1, T, T))

  def loss(q, causal):
    return jnp.sum(jnp.sin(decoder._attention(cfg, q, k, v, mask, causal=causal)))

  np.testing.assert_allclose(loss(q, True), loss(q, False), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(q, True), jax.grad(loss)(q, False), rtol=1e-4,
                             atol=1e-6)
  jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(q, True)
  shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
  assert not any(len(s) == 4 and s[-2:] == (T, T) for s in shapes)


# ----------------------------------------------------------------------------
# flash attention (decoder._flash_attention) against the plain attention math

def _plain_attention(q, k, v, mask, scaling, cap=None):
  """The definition, unblocked, in float32: softmax(mask(cap tanh(q k^T s / cap))) v,
  query head h reading key/value head h // g. Rows with no visible key are not
  defined here (callers compare the other rows)."""
  f32 = jnp.float32
  g = q.shape[2] // k.shape[2]
  q, k, v = (x.astype(f32) for x in (q, k, v))
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) * scaling
  if cap:
    s = cap * jnp.tanh(s / cap)
  s = jnp.where(mask[:, None], s, -1e30)
  out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)
  return out.reshape(*out.shape[:2], -1)


def _flash_case(case):
  """(config, q, k, v, mask, block) of a flash-attention test case: T = 3 blocks of 64
  + 37 (not a multiple of the block) unless the case says otherwise."""
  from lora_jax.models import decoder
  B, T, nh, nkv, hd, block = 2, 3 * 64 + 37, 4, 4, 16, 64
  kw, dtype = {}, jnp.float32
  if case == "gqa":
    nkv = 2                                       # query heads 0, 1 -> kv 0; 2, 3 -> kv 1
  elif case == "mqa_one_block":
    nkv, T = 1, 64                                # one block, no padding
  elif case == "softcap":
    kw = dict(attn_logit_softcapping=3.0, query_pre_attn_scalar=24)
  elif case == "bf16":
    nkv, dtype = 2, jnp.bfloat16
  cfg = decoder.DecoderConfig(vocab_size=32, hidden_size=nh * hd, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=nh,
                              num_key_value_heads=nkv, head_dim=hd, **kw)
  ks = jax.random.split(jax.random.key(7), 3)
  scale = 3.0 if case == "softcap" else 1.0       # scores well past the cap
  q = (scale * jax.random.normal(ks[0], (B, T, nh, hd))).astype(dtype)
  k, v = (jax.random.normal(x, (B, T, nkv, hd)).astype(dtype) for x in ks[1:])
  mask = jnp.tril(jnp.ones((T, T), bool))[None]
  if case == "packed":        # segments of 70, 100, then padding (segment 0); 2nd row: 1 segment
    seg = jnp.asarray([[1] * 70 + [2] * 100 + [3] * 20 + [0] * (T - 190),
                       [1] * T])
    mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, None, :]
  if case == "left_padding":  # 50 / 130 padding positions first (more than two blocks)
    am = jnp.arange(T)[None, :] >= jnp.asarray([[50], [130]])
    mask = mask & am[:, None, :]
  return cfg, q, k, v, jnp.broadcast_to(mask, (B, T, T)), block


@pytest.mark.parametrize("case", ["ragged", "gqa", "mqa_one_block", "softcap", "packed",
                                  "left_padding", "bf16"])
def test_flash_attention_matches_plain_attention(case):
  """Flash attention (query x key blocks, online softmax, custom VJP) equals the plain
  attention math and the decoder's dense path: values and gradients w.r.t. q, k, v, to
  float32 rounding (bf16 inputs: to bf16's). Rows with no visible key (left padding,
  segment 0) get zeros, and no value or gradient is ever NaN."""
  from lora_jax.models import decoder
  cfg, q, k, v, mask, block = _flash_case(case)
  hd = q.shape[-1]
  scaling = (cfg.query_pre_attn_scalar or hd) ** -0.5
  cap = cfg.attn_logit_softcapping
  seen_b = jnp.any(mask, axis=-1)[..., None]                         # (B, T, 1)
  seen = seen_b.astype(jnp.float32)
  w = jax.random.normal(jax.random.key(3), q.shape[:2] + (q.shape[2] * hd,))
  flash = lambda q, k, v: decoder._flash_attention(cfg, q, k, v, mask, block)  # noqa: E731
  dense = lambda q, k, v: decoder._attention(cfg, q, k, v, mask)               # noqa: E731
  plain = lambda q, k, v: _plain_attention(q, k, v, mask, scaling, cap)        # noqa: E731

  def grads(fn, w):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(
        q, k, v)

  got = jax.jit(flash)(q, k, v)
  assert got.dtype == q.dtype and got.shape == w.shape
  g_got = jax.jit(lambda w: grads(flash, w))(w * seen)
  if q.dtype == jnp.bfloat16:
    tol = dict(rtol=2e-2, atol=2e-2)
  else:
    tol = dict(rtol=1e-5, atol=1e-5)
  for ref in (plain, dense):
    want = jax.jit(ref)(q, k, v)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32) * seen),
                               np.asarray(want.astype(jnp.float32) * seen), **tol)
    g_want = jax.jit(lambda w: grads(ref, w))(w * seen)
    for a, b in zip(g_got, g_want):
      a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
      np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=tol["atol"] * np.abs(b).max())
  # rows with no visible key: zeros, and a cotangent on them changes no gradient
  assert not np.asarray(jnp.where(seen_b, 0, got)).any()
  g_all = jax.jit(lambda w: grads(flash, w))(w)
  for a, b in zip(g_all, g_got):
    assert np.isfinite(np.asarray(a.astype(jnp.float32))).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if case in ("packed", "left_padding"):
    assert not bool(jnp.all(seen_b))                # the case has such rows


def test_flash_attention_is_the_long_causal_path_of_the_model(monkeypatch):
  """`models.forward` at ATTN_FLASH_MIN_TOKENS + 29 tokens with left padding and packed
  segments takes the flash path and gives the logits (and LoRA-free gradients w.r.t.
  the embeddings) of the dense path at every position that sees a key."""
  from lora_jax import models
  from lora_jax.models import decoder
  cfg = models.DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  params = models.init_params(jax.random.key(0), cfg)
  T = decoder.ATTN_FLASH_MIN_TOKENS + 29
  ids = jax.random.randint(jax.random.key(1), (2, T), 0, 40)
  am = jnp.arange(T)[None, :] >= jnp.asarray([[0], [600]])
  seg = jnp.where(jnp.arange(T)[None, :] < 700, 1, 2) * jnp.ones((2, 1), jnp.int32)
  pos = jnp.where(jnp.arange(T) < 700, jnp.arange(T), jnp.arange(T) - 700)[None].repeat(2, 0)
  calls = []
  real = decoder._flash_attention
  monkeypatch.setattr(decoder, "_flash_attention", lambda *a: calls.append(1) or real(*a))

  def loss(p, w):
    out = models.forward(p, cfg, ids, attention_mask=am, segment_ids=seg, positions=pos)
    return jnp.sum(out * w), out

  w = jax.random.normal(jax.random.key(2), (2, T, 40)) * am[..., None].astype(jnp.float32)
  (_, got), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, w)
  assert calls
  monkeypatch.setattr(decoder, "ATTN_FLASH_MIN_TOKENS", 10 ** 9)
  (_, want), g_want = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, w)
  valid = np.asarray(am)[..., None]
  np.testing.assert_allclose(np.asarray(got) * valid, np.asarray(want) * valid, rtol=1e-5,
                             atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.abs(b).max()))


def test_flash_attention_memory_grows_linearly():
  """XLA's compiled memory analysis of a gradient through the long causal path: 4x the
  tokens take less than 3x the temporary bytes (linear would be 4x; the 512-query
  blocks under jax.checkpoint this replaced took 10.8x, 40.7 -> 440.8 MiB, from 1024
  to 4096 tokens with these sizes)."""
  from lora_jax.models import decoder
  cfg = decoder.DecoderConfig(vocab_size=32, hidden_size=64, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)

  def temp(T):
    q = jax.ShapeDtypeStruct((1, T, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, T, T), jnp.bool_)
    f = lambda q, k, v, m: jnp.sum(jnp.sin(decoder._attention(cfg, q, k, v, m, causal=True)))  # noqa: E731
    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes

  t1, t4 = temp(1024), temp(4096)
  assert t4 < 3 * t1, (t1, t4)
  # and no (T, T)-sized temporary: the mask itself is an argument
  assert t4 < 4096 * 4096, t4
