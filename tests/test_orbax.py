"""LoRA trees are plain pytrees: orbax checkpoints them as they are."""

import chex
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import lora_jax as lj


def test_adapter_and_full_lora_tree_roundtrip_through_orbax(tmp_path):
  key = jax.random.key(0)
  base = {"layers": {"kernel": jax.random.normal(key, (3, 8, 4))},
          "head": {"kernel": jax.random.normal(key, (4, 5)), "bias": jnp.zeros(5)}}
  cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*kernel", layouts={"layers/kernel": "lio"})
  params = lj.init(key, base, cfg)
  params = jax.tree.map(lambda x: x + 0.5, params)  # non-zero b
  adapter, frozen = lj.split(params)

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "adapter", adapter)
  ckpt.save(tmp_path / "full", params)
  ckpt.wait_until_finished()

  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, adapter)
  restored = ckpt.restore(tmp_path / "adapter", target)
  chex.assert_trees_all_equal(restored, adapter)
  back = lj.combine(restored, frozen)
  lw = back["layers"]["kernel"]
  assert isinstance(lw, lj.LoraWeight) and lw.axes == "io" and lw.scale == 2.0
  chex.assert_trees_all_close(lj.merge(back), lj.merge(params))

  full = ckpt.restore(tmp_path / "full", jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
  chex.assert_trees_all_close(lj.merge(full), lj.merge(params))


def test_qlora_tree_with_fully_trained_module_roundtrips_through_orbax(tmp_path):
  """NF4 codes (uint8), double-quant scales, LoRA factors and a `Trainable` head."""
  import quantization as qz
  key = jax.random.key(1)
  base = {"up": {"kernel": jax.random.normal(key, (64, 32))},
          "head": {"kernel": jax.random.normal(key, (32, 5))}}
  q = qz.quantize(base, qz.QuantConfig("nf4", 32, True, targets="up/kernel"))
  params = lj.init(key, q, lj.LoraConfig(rank=2, targets="up/kernel",
                                         modules_to_save="head/kernel"))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", params)
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "q", jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
  chex.assert_trees_all_equal(back, params)
  assert isinstance(back["up"]["kernel"].w, qz.QuantizedArray)
  assert back["up"]["kernel"].w.codes.dtype == jnp.uint8
  assert isinstance(back["head"]["kernel"], lj.Trainable)
