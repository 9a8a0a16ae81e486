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
