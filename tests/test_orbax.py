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
