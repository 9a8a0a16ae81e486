"""Bad input to the core (LoRA config and leaves, combine, multi-LoRA routing, quantized
leaves): a clear error naming the path / field, shapes and dtypes, or one documented,
tested outcome. Never a silent wrong result."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import lora_jax as lj
import merging as mg
import quantization as qz
from test_leaf_battery import ColumnScaled

KEY = jax.random.key(0)


def _base(seed=0, shape=(8, 6)):
  return {"mlp": {"up": jax.random.normal(jax.random.key(seed), shape)},
          "bias": jnp.zeros((shape[1],))}


def _adapter(base, seed, rank=2, alpha=4.0):
  p = lj.init(jax.random.key(seed), base, lj.LoraConfig(rank=rank, alpha=alpha, targets="mlp/up"))
  lw = p["mlp"]["up"]
  b = 0.3 * jax.random.normal(jax.random.key(seed + 100), lw.b.shape)
  return {**p, "mlp": {"up": dataclasses.replace(lw, b=b)}}


# ----------------------------------------------------------------------------
# LoraConfig and init

@pytest.mark.parametrize("kw,match", [
    (dict(alpha=math.inf), r"LoraConfig\.alpha must be a positive number \(and finite\), got inf"),
    (dict(alpha=math.nan), r"LoraConfig\.alpha must be a positive number"),
    (dict(alpha=True), r"LoraConfig\.alpha must be a positive number"),
    (dict(rank=True), r"LoraConfig\.rank must be a positive int"),
    (dict(rank=2.0), r"LoraConfig\.rank must be a positive int"),
    (dict(rank_pattern={"x": 0}), r"LoraConfig\.rank_pattern\[x\] must be a positive int"),
    (dict(alpha_pattern={"x": math.inf}), r"LoraConfig\.alpha_pattern\[x\] must be a positive"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(layouts={"x": "xo"}), r"layouts\['x'\] = 'xo'"),
    (dict(targets=[]), r"LoraConfig\.targets: targets patterns are empty"),
    (dict(modules_to_save=()), r"LoraConfig\.modules_to_save: modules_to_save patterns are empty"),
])
def test_config_rejects(kw, match):
  with pytest.raises(ValueError, match=match):
    lj.LoraConfig(**kw)


def test_empty_pattern_list_is_an_error():
  with pytest.raises(ValueError, match="rank_pattern/alpha_pattern patterns are empty|"
                                       "target patterns are empty"):
    lj.select_paths(["a/b"], [])


def test_init_on_an_adapted_leaf_names_it():
  p = _adapter(_base(), 1)
  with pytest.raises(ValueError, match=r"mlp/up: already a LoraWeight with trainable parts"):
    lj.init(KEY, p, lj.LoraConfig(targets="mlp/up"))


# ----------------------------------------------------------------------------
# leaves

W = jnp.zeros((6, 5))


@pytest.mark.parametrize("kw,err,match", [
    (dict(a=jnp.zeros((6, 2), jnp.int32), b=jnp.zeros((2, 5))), TypeError,
     r"factor a \(6, 2\) has dtype int32; LoRA factors must be floating"),
    (dict(a=jnp.zeros((6, 0)), b=jnp.zeros((0, 5))), ValueError, r"has rank 0 \(a \(6, 0\)"),
    (dict(a=jnp.zeros((6, 2)), b=jnp.zeros((2, 5)), scale=math.nan), ValueError,
     "scale must be a finite number, got nan"),
    (dict(a=jnp.zeros((6, 2)), b=jnp.zeros((2, 5)), scale=math.inf), ValueError,
     "scale must be a finite number"),
    (dict(a=[[0.0] * 2] * 6, b=jnp.zeros((2, 5))), TypeError, "a must be an array, got list"),
    (dict(a=jnp.zeros((5, 2)), b=jnp.zeros((2, 5))), ValueError,
     r"expected a \(6, 2\) and b \(2, 5\), got a \(5, 2\)"),
])
def test_lora_weight_rejects(kw, err, match):
  with pytest.raises(err, match=match):
    lj.LoraWeight(w=W, **kw)


def test_dora_weight_rejects():
  a, b = jnp.zeros((6, 2)), jnp.zeros((2, 5))
  with pytest.raises(ValueError, match="the magnitude m is required"):
    lj.DoraWeight(w=W, a=a, b=b)
  with pytest.raises(ValueError, match=r"magnitude m \(6,\) does not fit w \(6, 5\).*expected \(5,\)"):
    lj.DoraWeight(w=W, a=a, b=b, m=jnp.ones((6,)))


def _q():
  return qz.quantize_array(jax.random.normal(KEY, (64, 8)), "nf4", 32, double_quant=False)


@pytest.mark.parametrize("change,err,match", [
    (lambda q: dict(codes=q.codes.astype(jnp.int8)), TypeError,
     r"nf4 codes \(8, 32\) have dtype int8; expected uint8"),
    (lambda q: dict(codes=q.codes.astype(jnp.float32)), TypeError, "have dtype float32"),
    (lambda q: dict(absmax=q.absmax.at[0, 0].set(jnp.nan)), ValueError,
     r"absmax \(8, 2\) holds NaN/inf scales"),
    (lambda q: dict(absmax=q.absmax.at[3, 1].set(jnp.inf)), ValueError, "holds NaN/inf"),
    (lambda q: dict(codes=q.codes[:, :16]), ValueError, r"codes \(8, 16\) do not fit kernel"),
    (lambda q: dict(dtype="not-a-dtype"), TypeError, "is not a dtype"),
])
def test_quantized_array_rejects_tampered_children(change, err, match):
  q = _q()
  with pytest.raises(err, match=match):
    dataclasses.replace(q, **change(q))


def test_nan_weights_eager_raise_and_under_jit_give_an_all_nan_leaf():
  w = jax.random.normal(KEY, (128, 16)).at[5, 3].set(jnp.nan)
  with pytest.raises(ValueError, match=r"w: 1 NaN/inf value\(s\) in a weight of shape \(128, 16\)"):
    qz.quantize({"w": w}, qz.QuantConfig("nf4", 64))
  for dq in (False, True):
    q = jax.jit(lambda w: qz.quantize_array(w, "nf4", 64, dq))(w)
    assert np.isnan(np.asarray(q.materialize())).all()   # documented: the whole leaf is NaN
    err, _ = checkify.checkify(jax.jit(lambda w: qz.quantize_array(w, "nf4", 64, dq)))(w)
    assert "1 NaN/inf value(s)" in err.get()
  finite = jax.random.normal(KEY, (128, 16))
  q = jax.jit(lambda w: qz.quantize_array(w, "nf4", 64, True))(finite)
  assert np.isfinite(np.asarray(q.materialize())).all()


def test_bnb_state_dict_without_quant_state_is_an_error():
  q = qz.quantize_array(jax.random.normal(KEY, (64, 8)), "nf4", 64, double_quant=True)
  sd = qz.to_bnb_state_dict({"layer.weight": q})
  qs = [k for k in sd if "quant_state" in k][0]
  assert qz.from_bnb_state_dict(sd)["layer.weight"].shape == (64, 8)
  del sd[qs]
  with pytest.raises(ValueError, match=r"layer\.weight: has bitsandbytes companion "
                                       r"'layer\.weight\.absmax' but no"):
    qz.from_bnb_state_dict(sd)


# ----------------------------------------------------------------------------
# combine / split

def test_combine_of_different_ranks_names_the_path():
  base = _base()
  adapter, _ = lj.split(_adapter(base, 1, rank=2, alpha=4.0))
  _, frozen = lj.split(_adapter(base, 1, rank=4, alpha=4.0))
  with pytest.raises(ValueError, match=r"combine: frozen differs from adapter at mlp/up: "
                                       r"LoraWeight\(scale=2\.0, .* vs LoraWeight\(scale=1\.0"):
    lj.combine(adapter, frozen)
  # same structure, factors of another base shape: the rebuilt leaf does not fit
  _, frozen = lj.split(_adapter(_base(shape=(10, 6)), 1, rank=2, alpha=4.0))
  with pytest.raises(ValueError, match=r"combine: mlp/up: LoraWeight factors do not fit w "
                                       r"\(10, 6\).*got a \(8, 2\).*lj.split"):
    lj.combine(adapter, frozen)


def test_combine_with_a_path_in_one_tree_only():
  adapter, frozen = lj.split(_adapter(_base(), 1))
  frozen = {**frozen, "extra": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"only in frozen: \['extra'\]"):
    lj.combine(adapter, frozen)


def test_combine_with_a_leaf_set_twice():
  adapter, frozen = lj.split(_adapter(_base(), 1))
  frozen = {**frozen, "bias": jnp.ones(6)}
  adapter = {**adapter, "bias": jnp.ones(6)}
  with pytest.raises(ValueError, match=r"combine: bias is set in both adapter and frozen"):
    lj.combine(adapter, frozen)


# ----------------------------------------------------------------------------
# multi-LoRA routing

def _served(n=3):
  base = _base()
  trees = [_adapter(base, 10 + k) for k in range(n)]
  return base, trees, lj.stack_adapters(trees)


def _forward(p, x):
  return x @ p["mlp"]["up"] + p["bias"][None, :]


@pytest.mark.parametrize("ids,match", [
    ([0, 3], r"ids \[3\] are outside \[-1, 3\) for a bank of 3 adapters"),
    ([-2, 0], r"ids \[-2\] are outside \[-1, 3\)"),
    ([[0, 1]], "must be a 1-D integer array"),
    ([0.0, 1.0], "must be a 1-D integer array"),
])
def test_concrete_adapter_ids_are_checked(ids, match):
  _, _, served = _served()
  with pytest.raises(ValueError, match=match):
    lj.with_adapter_ids(served, jnp.asarray(ids))


def test_ids_on_a_tree_without_a_bank():
  with pytest.raises(ValueError, match="no MultiLoraWeight leaves"):
    lj.with_adapter_ids(_base(), jnp.array([0]))


def test_wrong_number_of_ids_names_both_counts():
  _, _, served = _served()
  x = jax.random.normal(KEY, (4, 8))
  with pytest.raises(ValueError, match=r"got 2 ids but x \(4, 8\) has 4 batch rows"):
    lj.implicit(_forward)(lj.with_adapter_ids(served, jnp.array([0, 1])), x)


def test_traced_out_of_range_ids_serve_the_base_never_nan():
  base, trees, served = _served()
  x = jax.random.normal(KEY, (5, 8))
  ids = jnp.array([0, 7, -5, 2, -1])

  @jax.jit
  def serve(ids, x):
    return lj.implicit(_forward)(lj.with_adapter_ids(served, ids), x)

  y = np.asarray(serve(ids, x))
  assert np.isfinite(y).all()
  want_base = np.asarray(_forward(base, x))
  for row in (1, 2, 4):                      # 7 and -5 behave as -1: the base only
    np.testing.assert_allclose(y[row], want_base[row], rtol=1e-5, atol=1e-5)
  for row, k in ((0, 0), (3, 2)):
    np.testing.assert_allclose(y[row], np.asarray(_forward(lj.merge(trees[k]), x))[row],
                               rtol=1e-4, atol=1e-4)
  err, _ = checkify.checkify(serve)(ids, x)
  assert "adapter ids outside [-1, 3)" in err.get()
  err, _ = checkify.checkify(serve)(jnp.array([0, 1, 2, -1, 0]), x)
  assert err.get() is None


@pytest.mark.parametrize("slot,match", [
    (3, r"slot 3 must be an int in \[0, 3\)"), (-1, r"slot -1 must be an int"),
    (1.0, "must be an int"),
])
def test_concrete_slots_are_checked(slot, match):
  base, trees, served = _served()
  with pytest.raises(ValueError, match=match):
    lj.set_adapter(served, slot, trees[0])


def test_traced_slot_out_of_range_leaves_the_bank_unchanged():
  base, trees, served = _served()
  new = _adapter(base, 99)
  swap = jax.jit(lambda s, slot: lj.set_adapter(s, slot, new))
  out = swap(served, jnp.int32(5))
  chex.assert_trees_all_equal(out, served)
  err, _ = checkify.checkify(swap)(served, jnp.int32(5))
  assert "slot 5 is outside the bank of 3 adapters" in err.get()
  out = swap(served, jnp.int32(1))
  np.testing.assert_array_equal(np.asarray(out["mlp"]["up"].b[1]), np.asarray(new["mlp"]["up"].b))


def test_adapters_of_another_base_are_refused():
  base, trees, served = _served(2)
  other_base = _base(seed=5)              # same shapes, other values
  stranger = _adapter(other_base, 3)
  with pytest.raises(ValueError, match=r"stack_adapters: mlp/up: adapter 2 was made on another "
                                       r"base weight than adapter 0 \(same shape \(8, 6\)"):
    lj.stack_adapters(trees + [stranger])
  with pytest.raises(ValueError, match=r"set_adapter: mlp/up: adapter new was made on another "
                                       "base weight than the served bank"):
    lj.set_adapter(served, 0, stranger)
  with pytest.raises(ValueError, match=r"merge_adapters: mlp/up: adapters\[1\] was made on "
                                       "another base weight"):
    mg.merge_adapters([trees[0], stranger], "linear")
  # the same base values in another array object are fine (a reloaded checkpoint)
  copy_base = jax.tree.map(lambda x: jnp.array(np.asarray(x)), base)
  lj.stack_adapters(trees + [_adapter(copy_base, 4)])


def test_kinds_a_bank_cannot_serve_are_named():
  base, trees, _ = _served(1)
  scaled = {**base, "mlp": {"up": ColumnScaled(w=base["mlp"]["up"], s=jnp.ones((6,)))}}
  with pytest.raises(ValueError, match=r"mlp/up in adapter 0 is a ColumnScaled with trainable "
                                       r"fields \('s',\); only LoRA and DoRA"):
    lj.stack_adapters([scaled])
  with pytest.raises(ValueError, match="at least one adapter tree"):
    lj.stack_adapters([])


def test_save_adapter_names_a_kind_without_a_peft_layout(tmp_path):
  base = _base()
  p = {**_adapter(base, 1), "bias": ColumnScaled(w=jnp.zeros((2, 6)), s=jnp.ones((6,)))}
  with pytest.raises(ValueError, match=r"bias: save_adapter writes LoRA / DoRA factors.*"
                                       "ColumnScaled"):
    lj.save_adapter(str(tmp_path / "ad"), p, lj.LoraConfig(rank=2, alpha=4, targets="mlp/up"))
  assert not (tmp_path / "ad").exists()
