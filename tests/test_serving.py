"""Multi-LoRA serving: each batch row gets exactly its own adapter's output."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj

KEY = jax.random.key(0)


def _adapter(params, seed, rank, targets, layouts=None):
  p = lj.init(jax.random.key(seed), params,
              lj.LoraConfig(rank=rank, alpha=2.0 * seed + 1, targets=targets,
                            layouts=layouts or {}))

  def fill(x):
    if isinstance(x, lj.LoraWeight):
      b = 0.2 * jax.random.normal(jax.random.key(100 + seed), x.b.shape)
      return lj.LoraWeight(w=x.w, a=x.a, b=b, scale=x.scale, axes=x.axes)
    return x
  return jax.tree.map(fill, p, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def mlp(p, x):
  return jnp.tanh(x @ p["up"]) @ p["down"]


def scan_model(p, x):
  return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])[0]


@pytest.mark.parametrize("model,params,targets,layouts", [
    (mlp, {"up": jax.random.normal(KEY, (8, 16)) / 3, "down": jax.random.normal(KEY, (16, 4)) / 4},
     "up|down", None),
    (scan_model, {"layers": jax.random.normal(KEY, (3, 8, 8)) / 3}, "layers", {"layers": "lio"}),
])
def test_each_row_gets_its_adapter(model, params, targets, layouts):
  adapters = [_adapter(params, s, r, targets, layouts) for s, r in [(1, 2), (2, 4), (3, 3)]]
  served = lj.stack_adapters(adapters)
  ids = jnp.array([2, -1, 0, 1, 1, 0])
  x = jax.random.normal(KEY, (6, 8))
  got = jax.jit(lj.implicit(model))(lj.with_adapter_ids(served, ids), x)
  for n, i in enumerate(np.asarray(ids)):
    ref_params = params if i < 0 else lj.merge(adapters[i])
    np.testing.assert_allclose(got[n], model(ref_params, x[n:n + 1])[0], rtol=1e-5, atol=1e-5)


def test_hot_swap_without_recompiling():
  params = {"up": jax.random.normal(KEY, (8, 16)) / 3, "down": jax.random.normal(KEY, (16, 4))}
  adapters = [_adapter(params, s, 4, "up|down") for s in (1, 2)]
  served = lj.stack_adapters(adapters)
  ids = jnp.array([0, 1])
  x = jax.random.normal(KEY, (2, 8))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def serve(s, ids, x):
    return lj.implicit(mlp)(lj.with_adapter_ids(s, ids), x)

  before = serve(served, ids, x)
  new = _adapter(params, 7, 2, "up|down")  # smaller rank: zero-padded into the slot
  served = lj.set_adapter(served, 1, new)
  after = serve(served, ids, x)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-6)  # slot 0 untouched
  np.testing.assert_allclose(after[1], mlp(lj.merge(new), x[1:])[0], rtol=1e-5, atol=1e-5)


def test_serving_errors():
  params = {"up": jnp.ones((8, 16)), "down": jnp.ones((16, 4))}
  a = _adapter(params, 1, 2, "up|down")
  b = _adapter(params, 2, 2, "up")
  with pytest.raises(ValueError, match="down: adapter 1 has no LoRA weight"):
    lj.stack_adapters([a, b])
  full = lj.init(KEY, params, lj.LoraConfig(rank=2, targets="up", modules_to_save="down"))
  with pytest.raises(ValueError, match=r"down in adapter 1 is a fully trained module"):
    lj.stack_adapters([a, full])
  served = lj.stack_adapters([a, a])
  with pytest.raises(ValueError, match=r"(up|down) has rank 4; the served bank holds rank <= 2"):
    lj.set_adapter(served, 0, _adapter(params, 3, 4, "up|down"))
  with pytest.raises(ValueError, match="adapter ids must be a 1-D integer array"):
    lj.with_adapter_ids(served, jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="with_adapter_ids"):
    lj.implicit(mlp)(served, jnp.ones((2, 8)))


@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_mixed_batch_generate_equals_each_adapter_alone(stacked):
  """Decoding with a KV cache: every row of one mixed batch produces the tokens its
  own adapter (or the base) produces alone."""
  from lora_jax.models import llama
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64)
  base = llama.init_params(KEY, cfg, stacked=stacked, std=0.2)
  targets = r"layers/(\d+/)?(self_attn|mlp)/.*_proj/kernel"
  ads = [_adapter(base, s, r, targets, llama.STACKED_LAYOUTS if stacked else None)
         for s, r in [(1, 2), (2, 3)]]
  route = [1, -1, 0, 1]
  prompt = jax.random.randint(jax.random.key(3), (4, 5), 1, cfg.vocab_size)
  served = lj.with_adapter_ids(lj.stack_adapters(ads), jnp.array(route))
  out = llama.generate(served, cfg, prompt, 6)
  for row, i in enumerate(route):
    alone = llama.generate(base if i < 0 else ads[i], cfg, prompt[row:row + 1], 6)
    np.testing.assert_array_equal(out[row], alone[0])
  assert len({tuple(np.asarray(r)) for r in out[:3]}) == 3   # the adapters matter


@pytest.mark.parametrize("model,params,targets,layouts", [
    (mlp, {"up": jax.random.normal(KEY, (8, 16)) / 3, "down": jax.random.normal(KEY, (16, 4)) / 4},
     "up|down", None),
    (scan_model, {"layers": jax.random.normal(KEY, (3, 8, 8)) / 3}, "layers", {"layers": "lio"}),
])
def test_dora_and_lora_adapters_in_one_batch(model, params, targets, layouts):
  """DoRA rows get their own magnitude, LoRA rows and base rows none."""
  def dora(seed, rank):
    p = lj.to_dora(_adapter(params, seed, rank, targets, layouts))
    return jax.tree.map(  # a trained magnitude, not the initial column norms
        lambda x: dataclasses.replace(x, m=x.m * (1.0 + 0.3 * jax.random.uniform(
            jax.random.key(seed), x.m.shape))) if isinstance(x, lj.DoraWeight) else x,
        p, is_leaf=lambda x: isinstance(x, lj.DoraWeight))
  adapters = [dora(1, 2), _adapter(params, 2, 4, targets, layouts), dora(3, 3)]
  served = lj.stack_adapters(adapters)
  ids = jnp.array([2, -1, 0, 1, 0])
  x = jax.random.normal(KEY, (5, 8))
  got = jax.jit(lj.implicit(model))(lj.with_adapter_ids(served, ids), x)
  for n, i in enumerate(np.asarray(ids)):
    ref = params if i < 0 else lj.merge(adapters[i])
    np.testing.assert_allclose(got[n], model(ref, x[n:n + 1])[0], rtol=1e-5, atol=1e-5)
  # hot swap a DoRA adapter into a LoRA slot; .adapter() gives it back
  new = dora(7, 2)
  served = lj.set_adapter(served, 1, new)
  got = lj.implicit(model)(lj.with_adapter_ids(served, jnp.array([1])), x[:1])
  np.testing.assert_allclose(got[0], model(lj.merge(new), x[:1])[0], rtol=1e-5, atol=1e-5)
  leaf = jax.tree.leaves(served, is_leaf=lambda v: isinstance(v, lj.MultiLoraWeight))[0]
  if leaf.nbatch == 0:
    back = leaf.adapter(1)
    assert isinstance(back, lj.DoraWeight)
    np.testing.assert_allclose(back.materialize(),
                               jax.tree.leaves(lj.merge(new))[0], rtol=1e-5, atol=1e-5)
  # a LoRA-only bank cannot take a DoRA adapter without changing shape
  plain = lj.stack_adapters([_adapter(params, 4, 2, targets, layouts)])
  with pytest.raises(ValueError, match="DoRA adapter but the served bank holds plain LoRA"):
    lj.set_adapter(plain, 0, new)


def test_bank_capacity_max_rank_and_empty_slots():
  """`stack_adapters(..., max_rank=R, slots=N)`: empty slots serve the base, a later
  adapter of a higher rank (<= R) fits without recompiling, past R is a named error."""
  params = {"up": jax.random.normal(KEY, (8, 16)) / 3, "down": jax.random.normal(KEY, (16, 12))}
  small = _adapter(params, 1, 2, "up|down")
  served = lj.stack_adapters([small], max_rank=8, slots=4)
  up = served["up"]
  assert up.n_adapters == 4 and up.a.shape == (4, 8, 8) and up.b.shape == (4, 8, 16)
  np.testing.assert_array_equal(np.asarray(up.scales)[1:], 0.0)
  traces = []

  @jax.jit
  def run(served, ids, x):
    traces.append(1)
    return lj.implicit(mlp)(lj.with_adapter_ids(served, ids), x)

  x = jax.random.normal(KEY, (4, 8))
  ids = jnp.array([0, 1, 2, 3])
  got = run(served, ids, x)
  np.testing.assert_allclose(got[0], mlp(lj.merge(small), x[:1])[0], rtol=1e-5, atol=1e-5)
  for n in (1, 2, 3):     # empty slots: the base alone
    np.testing.assert_allclose(got[n], mlp(params, x[n:n + 1])[0], rtol=1e-5, atol=1e-5)
  big = _adapter(params, 2, 8, "up|down")
  served = lj.set_adapter(served, 3, big)
  got = run(served, ids, x)
  np.testing.assert_allclose(got[3], mlp(lj.merge(big), x[3:])[0], rtol=1e-5, atol=1e-5)
  assert len(traces) == 1
  with pytest.raises(ValueError, match=r"down has rank 9; the served bank holds rank <= 8 "
                                       r"\(build it with lj.stack_adapters\(..., max_rank=9\)"):
    lj.set_adapter(served, 1, _adapter(params, 3, 9, "down"))
  with pytest.raises(ValueError, match="adapter 0 has rank 2, more than max_rank=1"):
    lj.stack_adapters([small], max_rank=1)
  with pytest.raises(ValueError, match="2 adapters do not fit slots=1"):
    lj.stack_adapters([small, small], slots=1)


def test_lora_bank_reserved_for_dora_takes_a_dora_adapter_later():
  params = {"up": jax.random.normal(KEY, (8, 16)) / 3, "down": jax.random.normal(KEY, (16, 4))}
  lora = _adapter(params, 1, 2, "up|down")
  dora = lj.init(jax.random.key(5), params,
                 lj.LoraConfig(rank=4, alpha=4.0, targets="up|down", use_dora=True))
  dora = jax.tree.map(lambda x: dataclasses.replace(x, b=0.3 * jnp.ones_like(x.b),
                                                    m=x.m * 1.5)
                      if isinstance(x, lj.DoraWeight) else x, dora,
                      is_leaf=lambda x: isinstance(x, lj.DoraWeight))
  with pytest.raises(ValueError, match="holds plain LoRA only"):
    lj.set_adapter(lj.stack_adapters([lora], max_rank=4, slots=2), 1, dora)
  served = lj.set_adapter(lj.stack_adapters([lora], max_rank=4, slots=2, dora=True), 1, dora)
  x = jax.random.normal(KEY, (3, 8))
  got = lj.implicit(mlp)(lj.with_adapter_ids(served, jnp.array([0, 1, -1])), x)
  np.testing.assert_allclose(got[0], mlp(lj.merge(lora), x[:1])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], mlp(lj.merge(dora), x[1:2])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[2], mlp(params, x[2:])[0], rtol=1e-5, atol=1e-5)


def test_qalora_adapter_is_served_as_its_exact_lora():
  import quantization as qz
  params = {"up": jax.random.normal(KEY, (128, 64)) / 3, "down": jax.random.normal(KEY, (64, 8))}
  qbase = qz.quantize(params, qz.QuantConfig(format="int4", block_size=32, symmetric=False))
  qa = lj.init(jax.random.key(2), qbase, lj.LoraConfig(rank=2, alpha=4.0, targets="up|down",
                                                       use_qalora=True, qalora_group_size=32))
  qa = jax.tree.map(lambda x: dataclasses.replace(x, b=0.2 * jnp.ones_like(x.b))
                    if isinstance(x, lj.QALoraWeight) else x, qa,
                    is_leaf=lambda x: isinstance(x, lj.QALoraWeight))
  served = lj.stack_adapters([qa], slots=2)
  x = jax.random.normal(KEY, (2, 128))
  got = lj.implicit(mlp)(lj.with_adapter_ids(served, jnp.array([0, 1])), x)
  ref = lj.implicit(mlp)(qa, x)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[1], lj.implicit(mlp)(qbase, x)[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("xshape", [(80, 8), (70, 3, 8)])
def test_many_rows_run_as_sgmv_and_equal_each_adapter_alone(xshape):
  """From SGMV_MIN_ROWS rows on, the LoRA term is sort-by-adapter + ragged_dot (one read
  of each adapter's factors); every row still equals its adapter alone."""
  from lora_jax import _serving
  assert xshape[0] >= _serving.SGMV_MIN_ROWS
  params = {"up": jax.random.normal(KEY, (8, 16)) / 3, "down": jax.random.normal(KEY, (16, 4))}
  adapters = [_adapter(params, s, r, "up|down") for s, r in [(1, 2), (2, 4), (3, 3)]]
  served = lj.stack_adapters(adapters, slots=4)
  ids = jnp.asarray(np.random.default_rng(0).integers(-1, 4, xshape[0]), jnp.int32)
  x = jax.random.normal(KEY, xshape)
  fn = lj.implicit(mlp)
  jaxpr = str(jax.make_jaxpr(fn)(lj.with_adapter_ids(served, ids), x))
  assert "ragged_dot" in jaxpr
  got = jax.jit(fn)(lj.with_adapter_ids(served, ids), x)
  for n, i in enumerate(np.asarray(ids)):
    ref = params if i < 0 or i == 3 else lj.merge(adapters[i])
    np.testing.assert_allclose(got[n], mlp(ref, x[n:n + 1])[0], rtol=1e-5, atol=1e-5)
