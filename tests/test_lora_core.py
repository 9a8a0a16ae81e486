"""LoRA as a tree transformation: init, split/combine, masks for optax, merge, summary,
paths, and the errors for bad input."""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj

KEY = jax.random.key(0)


def _params():
  k = jax.random.split(KEY, 4)
  return {
      "embed_tokens": {"embedding": jax.random.normal(k[0], (32, 16))},
      "layers": [
          {"self_attn": {"q_proj": {"kernel": jax.random.normal(k[1], (16, 16))},
                         "o_proj": {"kernel": jax.random.normal(k[2], (16, 16))}},
           "norm": {"scale": jnp.ones(16)}},
      ],
      "lm_head": {"kernel": jax.random.normal(k[3], (16, 32)), "bias": jnp.zeros(32)},
      "step": jnp.array(3, jnp.int32),
  }


def test_paths_are_slash_joined_and_select_by_fullmatch():
  paths = lj.select_paths([p for p, _ in lj.leaves_with_paths(_params())], r".*_proj/kernel")
  assert paths == {"layers/0/self_attn/q_proj/kernel", "layers/0/self_attn/o_proj/kernel"}
  # fullmatch: a prefix is not a match
  with pytest.raises(ValueError, match=r"matches no parameter path.*closest paths: .*q_proj"):
    lj.init(KEY, _params(), lj.LoraConfig(targets=r"layers/0/self_attn/q_pro"))


def test_init_shapes_scale_and_zero_b_keeps_function():
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*(q|o)_proj/kernel")
  p = lj.init(KEY, _params(), cfg)
  q = p["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(q, lj.LoraWeight)
  assert q.a.shape == (16, 4) and q.b.shape == (4, 16) and q.scale == 2.0
  assert not isinstance(p["lm_head"]["kernel"], lj.LoraWeight)
  chex.assert_trees_all_equal(lj.merge(p), _params())  # b = 0: nothing changes
  # PEFT's default init: a ~ U(-1/sqrt(in), 1/sqrt(in)), not all zero
  bound = 1 / math.sqrt(16)
  assert float(jnp.abs(q.a).max()) <= bound and float(jnp.abs(q.a).max()) > 0.5 * bound


def test_rslora_rank_and_alpha_patterns():
  cfg = lj.LoraConfig(rank=4, alpha=8, rslora=True, targets=r".*(q|o)_proj/kernel",
                      rank_pattern={r".*o_proj.*": 2}, alpha_pattern={r".*o_proj.*": 3.0})
  p = lj.init(KEY, _params(), cfg)
  q = p["layers"][0]["self_attn"]["q_proj"]["kernel"]
  o = p["layers"][0]["self_attn"]["o_proj"]["kernel"]
  assert q.rank == 4 and q.scale == pytest.approx(8 / math.sqrt(4))
  assert o.rank == 2 and o.scale == pytest.approx(3.0 / math.sqrt(2))


def test_gaussian_init_and_factor_dtype():
  cfg = lj.LoraConfig(rank=4, alpha=4, init="gaussian", dtype=jnp.bfloat16,
                      targets=r"lm_head/kernel")
  lw = lj.init(KEY, _params(), cfg)["lm_head"]["kernel"]
  assert lw.a.dtype == jnp.bfloat16 and lw.b.dtype == jnp.bfloat16 and lw.dtype == jnp.float32
  assert float(jnp.std(lw.a.astype(jnp.float32))) == pytest.approx(1 / 4, rel=0.25)


def _nonzero(p):
  return jax.tree.map(lambda x: x + 0.05 if x.dtype == jnp.float32 else x, p)


def test_merge_is_w_plus_scaled_ab():
  p = _nonzero(lj.init(KEY, _params(), lj.LoraConfig(rank=4, alpha=8, targets=r"lm_head/kernel")))
  lw = p["lm_head"]["kernel"]
  want = np.asarray(lw.w) + 2.0 * np.asarray(lw.a) @ np.asarray(lw.b)
  np.testing.assert_allclose(lj.merge(p)["lm_head"]["kernel"], want, rtol=1e-5, atol=1e-5)


def test_split_combine_roundtrip_and_mask():
  p = lj.init(KEY, _params(), lj.LoraConfig(rank=2, targets=r".*_proj/kernel"))
  adapter, frozen = lj.split(p)
  # adapter holds only the factors
  a_leaves = jax.tree.leaves(adapter)
  assert len(a_leaves) == 4 and all(x.shape in [(16, 2), (2, 16)] for x in a_leaves)
  back = lj.combine(adapter, frozen)
  chex.assert_trees_all_equal(jax.tree.leaves(back), jax.tree.leaves(p))
  mask = lj.trainable_mask(p)
  assert jax.tree.structure(mask) == jax.tree.structure(p)
  assert sum(jax.tree.leaves(mask)) == 4


def test_combine_mismatch_names_paths():
  p = lj.init(KEY, _params(), lj.LoraConfig(rank=2, targets=r".*_proj/kernel"))
  adapter, frozen = lj.split(p)
  del frozen["lm_head"]
  with pytest.raises(ValueError, match=r"only in adapter: \['lm_head/bias', 'lm_head/kernel'\]"):
    lj.combine(adapter, frozen)


def test_optax_masked_updates_only_factors():
  p = lj.init(KEY, _params(), lj.LoraConfig(rank=2, targets=r".*_proj/kernel"))
  p = _nonzero(p)
  floats = jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.floating), p)
  mask = jax.tree.map(lambda m, f: bool(m and f), lj.trainable_mask(p), floats)
  # optax.masked passes masked-out updates through; multi_transform freezes them.
  labels = jax.tree.map(lambda m: "lora" if m else "frozen", mask)
  opt = optax.multi_transform({"lora": optax.adamw(1e-2), "frozen": optax.set_to_zero()},
                              labels)
  # give every leaf a gradient of ones; only the factors may move
  grads = jax.tree.map(lambda x: jnp.ones_like(x) if jnp.issubdtype(x.dtype, jnp.floating)
                       else x, p)
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
    state = opt.init(p)
    updates, _ = opt.update(grads, state, p)
  new = optax.apply_updates(p, updates)
  q_old = p["layers"][0]["self_attn"]["q_proj"]["kernel"]
  q_new = new["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert not np.allclose(q_new.a, q_old.a) and not np.allclose(q_new.b, q_old.b)
  chex.assert_trees_all_equal(q_new.w, q_old.w)
  chex.assert_trees_all_equal(new["lm_head"], p["lm_head"])


def test_grad_wrt_adapter_only_and_adamw_state_is_small():
  p = _nonzero(lj.init(KEY, _params(), lj.LoraConfig(rank=2, targets=r".*_proj/kernel")))
  adapter, frozen = lj.split(p)

  def loss(prm, x):
    h = x @ prm["layers"][0]["self_attn"]["q_proj"]["kernel"]
    return jnp.sum(jnp.tanh(h @ prm["layers"][0]["self_attn"]["o_proj"]["kernel"]))

  x = jax.random.normal(KEY, (3, 16))
  g = jax.jit(jax.grad(lambda ad: lj.implicit(loss)(lj.combine(ad, frozen), x)))(adapter)
  g_ref = jax.grad(lambda ad: loss(lj.merge(lj.combine(ad, frozen)), x))(adapter)
  with pytest.raises(TypeError, match=r"lj.combine\(adapter, frozen\)"):
    lj.implicit(loss)(adapter, x)  # a half tree is a clear error
  chex.assert_trees_all_close(g, g_ref, atol=1e-4, rtol=1e-4)
  state = optax.adamw(1e-3).init(adapter)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert n_state == 2 * 4 * 16 * 2  # mu and nu for 2 layers x (a, b), nothing for w


def test_summary_counts():
  p = lj.init(KEY, _params(), lj.LoraConfig(rank=2, targets=r".*_proj/kernel"))
  s = lj.summary(p)
  total = 32 * 16 + 2 * 16 * 16 + 16 + 16 * 32 + 32 + 1 + 2 * (2 * 16 * 2)
  assert f"trainable params: {2 * 2 * 16 * 2:,} || all params: {total:,}" in s
  assert re.search(r"layers/0/self_attn/q_proj/kernel\s+16x16\s+2\s+64", s)


@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-3), "rank must be a positive int"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(alpha=-1.0), "alpha must be a positive number"),
    (dict(init="kaiming"), "init must be one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(layouts={".*": "xyz"}), "layouts"),
])
def test_config_rejects_bad_values(kw, match):
  with pytest.raises(ValueError, match=match):
    lj.LoraConfig(**kw)


def test_rank_larger_than_kernel_allows():
  with pytest.raises(ValueError, match=r"lm_head/kernel: rank 17 exceeds min\(in=16, out=32\)"):
    lj.init(KEY, _params(), lj.LoraConfig(rank=17, targets=r"lm_head/kernel"))


def test_target_on_integer_or_vector_leaf():
  with pytest.raises(TypeError, match=r"step: target has dtype int32"):
    lj.init(KEY, _params(), lj.LoraConfig(targets=r"step"))
  with pytest.raises(ValueError, match=r"lm_head/bias: target has shape \(32,\)"):
    lj.init(KEY, _params(), lj.LoraConfig(targets=r"lm_head/bias"))


def test_nd_kernel_needs_layout():
  params = {"attn": {"kernel": jnp.zeros((8, 2, 4))}}
  with pytest.raises(ValueError, match=r"attn/kernel: kernel of shape \(8, 2, 4\).*layouts"):
    lj.init(KEY, params, lj.LoraConfig(rank=2, targets=r"attn/kernel"))
  p = lj.init(KEY, params, lj.LoraConfig(rank=2, targets=r"attn/kernel",
                                         layouts={r"attn/.*": "ioo"}))
  assert p["attn"]["kernel"].a.shape == (8, 2) and p["attn"]["kernel"].b.shape == (2, 2, 4)
  stacked = {"layers": {"kernel": jnp.zeros((3, 8, 4))}}
  p = lj.init(KEY, stacked, lj.LoraConfig(rank=2, targets=r".*kernel", layouts={".*": "lio"}))
  lw = p["layers"]["kernel"]
  assert lw.a.shape == (3, 8, 2) and lw.b.shape == (3, 2, 4) and lw.axes == "io"


@settings(max_examples=15, deadline=None)
@given(d_in=st.integers(2, 12), d_out=st.integers(2, 12), r=st.integers(1, 6),
       alpha=st.floats(0.5, 32), rslora=st.booleans())
def test_property_factored_forward_equals_merged(d_in, d_out, r, alpha, rslora):
  r = min(r, d_in, d_out)
  params = {"k": jax.random.normal(KEY, (d_in, d_out))}
  p = lj.init(KEY, params, lj.LoraConfig(rank=r, alpha=alpha, rslora=rslora, targets="k"))
  p = {"k": lj.LoraWeight(w=p["k"].w, a=p["k"].a, b=jnp.ones_like(p["k"].b) * 0.1,
                          scale=p["k"].scale, axes="io")}
  x = jax.random.normal(jax.random.key(1), (3, d_in))
  got = lj.implicit(lambda q, y: y @ q["k"])(p, x)
  np.testing.assert_allclose(got, x @ lj.merge(p)["k"], rtol=2e-4, atol=2e-4)


def test_dropout_only_with_rng_and_unbiased():
  params = {"k": jax.random.normal(KEY, (16, 8))}
  p = lj.init(KEY, params, lj.LoraConfig(rank=4, alpha=4, dropout=0.5, targets="k"))
  lw = p["k"]
  p = {"k": lj.LoraWeight(w=lw.w, a=lw.a, b=jnp.ones_like(lw.b), scale=lw.scale,
                          axes=lw.axes, dropout=lw.dropout)}
  x = jax.random.normal(KEY, (4, 16))
  f = jax.jit(lj.implicit(lambda q, y: y @ q["k"]))
  no_drop = f(p, x)
  np.testing.assert_allclose(no_drop, x @ lj.merge(p)["k"], rtol=1e-5, atol=1e-5)  # no rng
  outs = jnp.stack([f(lj.with_dropout_rng(p, jax.random.key(s)), x) for s in range(400)])
  assert not np.allclose(outs[0], no_drop)  # dropout is active with an rng
  assert not np.allclose(outs[0], outs[1])  # and a new key draws a new mask
  # base path untouched: each output differs from no_drop only through the branch,
  # and the branch is unbiased (inverted dropout), so the mean converges to no_drop.
  branch_sd = float(jnp.std(outs - no_drop[None]))
  np.testing.assert_allclose(outs.mean(0), no_drop, atol=4 * branch_sd / np.sqrt(400))


def test_dropout_keys_follow_stacked_layers():
  params = {"k": jnp.zeros((3, 8, 4))}
  p = lj.init(KEY, params, lj.LoraConfig(rank=2, dropout=0.1, targets="k",
                                         layouts={"k": "lio"}))
  rng = lj.with_dropout_rng(p, KEY)["k"].rng
  assert rng.shape == (3,)  # one key per layer so scan slices it with the weights
