"""The examples run and do what they say (short versions)."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


@pytest.mark.slow
def test_finetune_lora_loss_falls(standard_promotion):
  import finetune_lora
  run = finetune_lora.main(steps=60, pretrain_steps=10, batch=8, verbose=False)
  loss = np.asarray(run["loss"])
  assert np.all(np.isfinite(loss))
  assert loss[-5:].mean() < 0.7 * loss[:5].mean()
  assert "trainable params:" in run["summary"]


def test_implicit_passes_static_arguments_through():
  import dataclasses
  import jax
  import lora_jax as lj

  @dataclasses.dataclass(frozen=True)
  class Cfg:
    act: str

  def f(p, cfg, x, *, shift=0):
    y = x @ p["k"]
    return (jnp.tanh(y) if cfg.act == "tanh" else y) + shift

  p = lj.init(jax.random.key(0), {"k": jnp.ones((4, 3))}, lj.LoraConfig(rank=2, targets="k"))
  x = jnp.ones((2, 4))
  np.testing.assert_allclose(lj.implicit(f)(p, Cfg("tanh"), x, shift=1),
                             f(lj.merge(p), Cfg("tanh"), x, shift=1), rtol=1e-6)
  np.testing.assert_allclose(lj.implicit(f)(p, Cfg("id"), x), f(lj.merge(p), Cfg("id"), x),
                             rtol=1e-6)


@pytest.mark.slow
def test_qlora_example_trains_and_keeps_codes(capsys):
  import jax
  import qlora
  with jax.numpy_dtype_promotion("standard"):
    run = qlora.main(steps=30)
  loss = np.asarray(run["loss"])
  assert np.all(np.isfinite(loss))
  assert loss[-5:].mean() < loss[:5].mean() - 0.2
  out = capsys.readouterr().out
  assert "quantized codes unchanged by training: True" in out
  # the trained adapter sits on NF4 kernels, and nothing else was trained
  import lora_jax as lj
  import quantization as qz
  kernel = run["params"]["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(kernel, lj.LoraWeight) and isinstance(kernel.w, qz.QuantizedArray)


def test_sharded_qlora_example_matches_one_device_and_trains(capsys):
  import jax
  import sharded_qlora
  assert len(jax.devices()) == 8
  with jax.numpy_dtype_promotion("standard"):
    run = sharded_qlora.main(steps=15)
  loss = np.asarray(run["loss"])
  np.testing.assert_allclose(loss[0], run["first_loss_1dev"], rtol=1e-5)
  assert loss[-3:].mean() < loss[:3].mean() - 0.1
  assert run["mesh"] == {"data": 2, "model": 4}
  on0, whole = run["bytes"]["base (NF4 codes + scales, dense leaves)"]
  assert on0 < 0.35 * whole          # the quantized base is split over "model"
  assert "over 8 cpu devices" in capsys.readouterr().out


@pytest.mark.slow
def test_modulora_example_trains_over_3_and_2_bit_gptq_bases(capsys):
  """ModuLoRA: LoRA over GPTQ int3 / int2 bases; GPTQ's logits are closer to the float
  model's than round-to-nearest's, and the fine-tune's loss falls at both widths."""
  import jax
  import modulora
  with jax.numpy_dtype_promotion("standard"):
    run = modulora.main(steps=25)
  for bits in (3, 2):
    loss = np.asarray(run[bits]["loss"])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < loss[:5].mean() - 0.2, (bits, loss)
    assert run[bits]["gptq_mse"] < run[bits]["rtn_mse"], (bits, run[bits])
  out = capsys.readouterr().out
  assert "3-bit base (int3" in out and "2-bit base (int2" in out
