"""`lj.partition_specs` / `lj.named_shardings` / `lj.shard`: a dense layout carried to
LoRA, DoRA, multi-LoRA and quantized leaves, on the 8-device host mesh.

References: the unsharded computation (values), the children's shapes (specs follow the
axes they share with the kernel), and the compiled HLO (no all-gather of a kernel)."""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import lora_jax as lj
import quantization as qz
from lora_jax.models import llama
from lora_testing import randomize_b as _randomize

KEY = jax.random.key(0)


def _randomize_b(params, key=KEY):
  return _randomize(params, key, std=0.05)
CFG = llama.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64)
# Megatron layout on a (data, model) mesh; the stacked layer axis comes first.
MEGATRON = [
    (r"layers/self_attn/(q|k|v)_proj/kernel", PS(None, None, "model")),
    (r"layers/self_attn/o_proj/kernel", PS(None, "model", None)),
    (r"layers/mlp/(gate|up)_proj/kernel", PS(None, None, "model")),
    (r"layers/mlp/down_proj/kernel", PS(None, "model", None)),
    (r"embed_tokens/embedding", PS(None, "model")),
    (r"lm_head/kernel", PS(None, "model")),
]
TARGETS = r"layers/(self_attn|mlp)/.*_proj/kernel"


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _lora_llama(quantized=False):
  base = llama.init_params(KEY, CFG, stacked=True)
  if quantized:
    base = qz.quantize(base, qz.QuantConfig("nf4", 32, True, targets=TARGETS))
  cfg = lj.LoraConfig(rank=8, alpha=16, targets=TARGETS, layouts=llama.STACKED_LAYOUTS)
  return _randomize_b(lj.init(jax.random.key(1), base, cfg))


def _ids():
  return jax.random.randint(jax.random.key(2), (4, 16), 0, CFG.vocab_size)


def _loss(adapter, frozen, ids):
  logits = lj.implicit(llama.forward)(lj.combine(adapter, frozen), CFG, ids)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0])


def _assert_on_mesh(tree, shardings):
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_sharded_llama_step_equals_unsharded(mesh, quantized):
  params = _lora_llama(quantized)
  ids = _ids()
  adapter, frozen = lj.split(params)
  # the reference: the same step on one device (jitted: eager runs op by op, slowly)
  want_loss, want_g = jax.jit(jax.value_and_grad(_loss))(adapter, frozen, ids)

  sharded = lj.shard(params, mesh, MEGATRON)
  _assert_on_mesh(sharded, lj.named_shardings(params, mesh, MEGATRON))
  s_adapter, s_frozen = lj.split(sharded)
  x = jax.device_put(ids, NamedSharding(mesh, PS("data", None)))
  # gradients laid out like the adapter they update, as an optimizer step wants them
  ad_sh = jax.tree.map(lambda a: a.sharding, s_adapter)
  step = jax.jit(jax.value_and_grad(_loss), out_shardings=(None, ad_sh))
  loss, g = step(s_adapter, s_frozen, x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(g, want_g, rtol=1e-4, atol=1e-6)


def test_children_follow_the_axes_they_share_with_the_kernel():
  specs = lj.partition_specs(_lora_llama(), MEGATRON)
  q = specs["layers"]["self_attn"]["q_proj"]["kernel"]     # column parallel (l, in, out)
  assert (q.w, q.a, q.b) == (PS(None, None, "model"), PS(None, None, None),
                             PS(None, None, "model"))
  o = specs["layers"]["self_attn"]["o_proj"]["kernel"]     # row parallel
  assert (o.w, o.a, o.b) == (PS(None, "model", None), PS(None, "model", None),
                             PS(None, None, None))
  assert specs["norm"]["scale"] == PS(None)                 # unmatched: replicated


def test_quantized_children_swap_in_and_out():
  specs = lj.partition_specs(_lora_llama(quantized=True), MEGATRON)
  o = specs["layers"]["self_attn"]["o_proj"]["kernel"].w    # kernel (l, in, out), "model" on in
  assert isinstance(o, qz.QuantizedArray)
  # codes and absmax are stored (l, out, in): the "model" entry moves to the last axis
  assert (o.codes, o.absmax, o.nested_absmax, o.offset) == (
      PS(None, None, "model"), PS(None, None, "model"), PS(None, None), PS(None))


def test_no_all_gather_of_a_kernel(mesh):
  """Column- then row-parallel LoRA'd MLP: the factored path needs only the all-reduce
  the base needs (plus one of the small `x @ A`), never a gathered kernel."""
  d, f = 64, 256
  base = {"up": jax.random.normal(KEY, (d, f)) / 8, "down": jax.random.normal(KEY, (f, d)) / 16}
  params = _randomize_b(lj.init(KEY, base, lj.LoraConfig(rank=8, targets="up|down")))
  rules = [("up", PS(None, "model")), ("down", PS("model", None))]
  sh = lj.named_shardings(params, mesh, rules)
  x = jax.random.normal(KEY, (16, d))

  def mlp(p, x):
    return jax.nn.gelu(x @ p["up"]) @ p["down"]

  fn = jax.jit(lj.implicit(mlp), in_shardings=(sh, NamedSharding(mesh, PS("data", None))))
  hlo = fn.lower(params, x).compile().as_text()
  np.testing.assert_allclose(fn(params, x), mlp(lj.merge(params), x), rtol=1e-4, atol=1e-5)
  gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", ln)]
  for shape in ("64,256", "256,64", "f32[64,64]", "f32[256,256]"):
    assert not [g for g in gathers if shape in g], gathers
  assert re.search(r"\ball-reduce(-start)?\(", hlo)        # the row-parallel sum is there


def test_dora_and_multi_lora_specs_and_values(mesh):
  base = {"k": jax.random.normal(KEY, (32, 64)) / 6}
  lp = _randomize_b(lj.init(KEY, base, lj.LoraConfig(rank=4, targets="k")))
  dp = lj.to_dora(lp)
  rules = [("k", PS(None, "model"))]
  assert lj.partition_specs(dp, rules)["k"].m == PS("model")
  x = jax.random.normal(KEY, (8, 32))
  f = lambda p, x: x @ p["k"]  # noqa: E731
  np.testing.assert_allclose(jax.jit(lj.implicit(f))(lj.shard(dp, mesh, rules), x),
                             f(lj.merge(dp), x), rtol=1e-4, atol=1e-5)

  lps = [_randomize_b(lj.init(jax.random.key(i), base, lj.LoraConfig(rank=2 + i, targets="k")),
                      jax.random.key(i)) for i in range(3)]
  lps[2] = lj.to_dora(lps[2])           # a DoRA adapter in the bank: per-adapter magnitudes
  served = lj.with_adapter_ids(lj.stack_adapters(lps), jnp.array([0, 1, 2, -1, 2, 1, 0, -1]))
  s = lj.partition_specs(served, rules)["k"]
  assert (s.a, s.b, s.scales, s.ids, s.mags) == (
      PS(None, None, None), PS(None, None, "model"), PS(None), PS(None), PS(None, "model"))
  got = jax.jit(lj.implicit(f))(lj.shard(served, mesh, rules), x)
  for row, i in enumerate([0, 1, 2, -1, 2, 1, 0, -1]):
    w = base["k"] if i < 0 else lj.merge(lps[i])["k"]
    np.testing.assert_allclose(got[row], x[row] @ w, rtol=1e-4, atol=1e-5)


def test_flax_spec_tree_and_function_rules(mesh):
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.initializers.lecun_normal()
      x = nn.Dense(64, kernel_init=nn.with_partitioning(init, (None, "model")))(x)
      return nn.Dense(16, kernel_init=nn.with_partitioning(init, ("model", None)))(nn.relu(x))

  x = jnp.ones((4, 16))
  variables = MLP().init(KEY, x)
  spec_tree = nn.get_partition_spec(variables)["params"]
  base = nn.unbox(variables)["params"]
  params = _randomize_b(lj.init(KEY, base, lj.LoraConfig(rank=4, targets=r"Dense_\d/kernel")))
  from_tree = lj.partition_specs(params, spec_tree)
  from_fn = lj.partition_specs(
      params, lambda path, leaf: PS("model", None) if path == "Dense_1/kernel"
      else PS(None, "model") if path == "Dense_0/kernel" else PS())
  assert from_tree == from_fn
  assert from_tree["Dense_1"]["kernel"].a == PS("model", None)
  apply = lambda p, x: MLP().apply({"params": p}, x)  # noqa: E731
  got = jax.jit(lj.implicit(apply))(lj.shard(params, mesh, spec_tree), x)
  np.testing.assert_allclose(got, apply(lj.merge(params), x), rtol=1e-5, atol=1e-6)


def test_bad_layouts_name_the_path_shape_and_mesh(mesh):
  params = _lora_llama(quantized=True)
  with pytest.raises(ValueError, match=r"rule 'layers/attn/q_proj/kernel' matches no leaf"
                     r".*self_attn/q_proj/kernel"):
    lj.partition_specs(params, [("layers/attn/q_proj/kernel", PS())])
  with pytest.raises(ValueError, match=r"norm/scale: PartitionSpec .* 2 entries .* \(128,\)"):
    lj.partition_specs(params, [("norm/scale", PS(None, "model"))])
  with pytest.raises(ValueError, match=r"names mesh axes \['tensor'\].*'data': 2, 'model': 4"):
    lj.named_shardings(params, mesh, [("lm_head/kernel", PS(None, "tensor"))])
  # o_proj kernel (2, 128, 128) split on `in`: 128 / 32 = 4 blocks fit 4 devices, but
  # an 8-way split of the 4 absmax blocks does not
  with pytest.raises(ValueError, match=r"o_proj/kernel/w/absmax: shape \(2, 128, 4\) .*"
                     r"size 4 is not divisible by 8"):
    lj.named_shardings(params, mesh, [(r"layers/self_attn/o_proj/kernel",
                                       PS(None, ("data", "model"), None))])
  with pytest.raises(ValueError, match=r"spec tree has no entry for .* leaves"):
    lj.partition_specs(params, {"norm": {"scale": PS()}})
