"""GPU and TPU readiness without a device: programs traced on this CPU host are
exported for ("cpu", "cuda", "tpu") with `jax.export`; each platform's part holds the
call it should (the Pallas Triton call on CUDA, the Mosaic call on TPU, none on CPU),
and the exported program, run here, takes its CPU part and equals the jitted one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import lora_jax as lj
import quantization as qz
from lora_jax import extend
from lora_jax.models import llama
from quantization import _pallas

PLATFORMS = ("cpu", "cuda", "tpu")
TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
CUDNN = "__cudnn$fmhaSoftmax"
# Triton and cuDNN calls carry no serialization guarantee; exporting them is opting in.
CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON),
          export.DisabledSafetyCheck.custom_call(CUDNN)]


def custom_calls(exp) -> set[str]:
  return set(re.findall(r"custom_call @([\w$.]+)", exp.mlir_module()))


def export_for(fn, *args, platforms=PLATFORMS):
  return export.export(jax.jit(fn), platforms=platforms, disabled_checks=CHECKS)(*args)


def _weight(k, n, fmt, dtype, block=64, seed=0):
  w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32) * 0.05
  return qz.quantize_array(w.astype(dtype), fmt, block, fmt != "int8")


def test_per_platform_runs_the_cpu_implementation_here_and_lowers_each_for_its_own():
  """`extend.per_platform`: eager, jitted and vmapped calls run the CPU implementation;
  an export holds each platform's own (told apart by a constant only it has); a missing
  platform without "default" is refused, naming it."""
  impls = {"cpu": lambda x, y: {"s": x * 2.0 + y}, "tpu": lambda x, y: {"s": x * 7.0 + y},
           "default": lambda x, y: {"s": x * 5.0 + y}}
  x, y = jnp.arange(3.0), jnp.ones(3)
  call = lambda x, y: extend.per_platform(impls, x, y)["s"]        # noqa: E731
  want = x * 2.0 + y
  np.testing.assert_array_equal(call(x, y), want)
  np.testing.assert_array_equal(jax.jit(call)(x, y), want)
  xs = jnp.stack([x, x + 1])
  np.testing.assert_array_equal(jax.vmap(call, in_axes=(0, None))(xs, y), xs * 2.0 + y[None])
  exp = export_for(call, x, y)
  text = exp.mlir_module()
  assert all(f"{c:.0f}.000000e+00" in text for c in (2, 5, 7))     # cpu, cuda (default), tpu
  np.testing.assert_array_equal(exp.call(x, y), want)
  only_tpu = export_for(call, x, y, platforms=("tpu",)).mlir_module()
  assert "7.000000e+00" in only_tpu and "2.000000e+00" not in only_tpu
  with pytest.raises(ValueError, match=r"no implementation for \['cuda', 'rocm'\]"):
    extend.per_platform({"cpu": impls["cpu"], "tpu": impls["tpu"]}, x, y)


# M: GEMV, a small and a large GEMM; K: a multiple of the K tile, and not (1376 = 21.5
# blocks of 64 pads to 1408); every format, bf16 and f32.
MATMUL_CASES = [
    (1, 1376, 512, "nf4", jnp.bfloat16),
    (1, 1024, 256, "fp4", jnp.float32),
    (8, 1376, 256, "int4", jnp.bfloat16),
    (16, 512, 384, "int8", jnp.float32),
    (256, 1376, 512, "nf4", jnp.float32),
    (5, 100, 24, "fp4", jnp.bfloat16),        # K below one block: padded
]


@pytest.mark.parametrize("m,k,n,fmt,dtype", MATMUL_CASES)
def test_auto_matmul_exports_a_kernel_per_platform(m, k, n, fmt, dtype):
  q = _weight(k, n, fmt, dtype, seed=m + k)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
  fn = lambda x, q: qz.matmul(x, q)                      # noqa: E731  backend "auto"
  exp = export_for(fn, x, q)
  assert {TRITON, MOSAIC} <= custom_calls(exp)
  assert exp.platforms == PLATFORMS
  # the CPU part holds no kernel, and it is what runs here: XLA's exact result
  assert not custom_calls(export_for(fn, x, q, platforms=("cpu",)))
  np.testing.assert_array_equal(np.asarray(exp.call(x, q), np.float32),
                                np.asarray(qz.matmul(x, q, "xla"), np.float32))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_each_accelerator_alone_gets_its_own_kernel_only(fmt):
  q = _weight(320, 96, fmt, jnp.bfloat16)
  x = jnp.ones((4, 320), jnp.bfloat16)
  fn = lambda x, q: qz.matmul(x, q)                      # noqa: E731
  assert custom_calls(export_for(fn, x, q, platforms=("cuda",))) == {TRITON}
  assert custom_calls(export_for(fn, x, q, platforms=("tpu",))) == {MOSAIC}


def test_auto_is_chosen_when_lowered_not_when_traced():
  """One jaxpr traced here carries both kernels: the choice is made by the lowering."""
  q = _weight(256, 128, "nf4", jnp.float32)
  x = jnp.ones((4, 256), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda x, q: qz.matmul(x, q))(x, q))
  assert "lora_jax_per_platform" in jaxpr
  assert "pallas_call" not in jaxpr          # the kernels are made at lowering time
  hlo = jax.jit(lambda x, q: qz.matmul(x, q)).lower(x, q).as_text()
  assert "custom_call" not in hlo and "pallas" not in hlo


def test_pallas_backend_on_cpu_runs_the_interpreter_and_exports_kernels():
  q = _weight(200, 40, "int8", jnp.float32)
  x = jax.random.normal(jax.random.key(1), (3, 200))
  fn = lambda x, q: qz.matmul(x, q, "pallas")                 # noqa: E731
  np.testing.assert_allclose(fn(x, q), qz.matmul(x, q, "xla"), rtol=1e-5, atol=1e-5)
  assert {TRITON, MOSAIC} <= custom_calls(export_for(fn, x, q))


def test_the_gpu_kernel_is_triton_even_where_mosaic_gpu_is_the_default():
  """jax 0.10 lowers a `pallas_call` without compiler params through Mosaic GPU, which
  this kernel does not fit; the kernel names its lowering."""
  q = _weight(512, 256, "nf4", jnp.bfloat16)
  x = jnp.ones((8, 512), jnp.bfloat16)
  with _mosaic_gpu_default():
    calls = custom_calls(export_for(lambda x, q: qz.matmul(x, q), x, q, platforms=("cuda",)))
  assert calls == {TRITON}
  assert _pallas.GPU_LOWERING == "triton"


class _mosaic_gpu_default:
  def __enter__(self):
    self.old = jax.config.jax_pallas_use_mosaic_gpu
    jax.config.update("jax_pallas_use_mosaic_gpu", True)

  def __exit__(self, *exc):
    jax.config.update("jax_pallas_use_mosaic_gpu", self.old)


def test_grouped_and_flat_weights_export_the_xla_path_everywhere():
  """Kinds without a kernel (group-wise int4, bnb's flat layout) take XLA on every
  platform: no kernel call in any part."""
  w = jax.random.normal(jax.random.key(0), (96, 64)) * 0.05
  for q in (qz.quantize_group_array(w, 4, 32),
            qz.quantize_array(w[:, :60], "nf4", 64, True, layout="flat")):
    x = jnp.ones((2, q.kernel_shape[0]))
    assert not custom_calls(export_for(lambda x, q: qz.matmul(x, q), x, q))


@pytest.mark.parametrize("block_m,dtype", [(8, jnp.float32), (24, jnp.bfloat16),
                                           (100, jnp.float32)])
def test_tpu_tiles_are_rounded_to_mosaic_tiling_and_checked(block_m, dtype):
  """User tiles that break Mosaic's rules are rounded; the wrapper's check would name
  the operand otherwise, and every block it makes passes it."""
  q = _weight(1376, 300, "nf4", dtype)
  x = jnp.ones((40, 1376), dtype)
  tiles = qz.QMatmulTiles(block_m=block_m, block_n=100, block_k=300)
  fn = lambda x, q: _pallas.qmatmul(x, q.codes, q.scales(), fmt="nf4", block=64,   # noqa: E731
                                    in_features=1376, tiles=tiles, platform="tpu")
  assert custom_calls(export_for(fn, x, q, platforms=("tpu",))) == {MOSAIC}
  y = _pallas.qmatmul(x, q.codes, q.scales(), fmt="nf4", block=64, in_features=1376,
                      tiles=tiles, platform="tpu", interpret=True, out_dtype=jnp.float32)
  ref = qz.qmatmul_reference(x, q.codes, q.scales(), fmt="nf4", block=64, in_features=1376,
                             out_dtype=jnp.float32)
  np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(ref))))


def test_tpu_block_check_names_the_operand():
  with pytest.raises(ValueError, match=r"codes block \(40, 256\) of the uint8 array "
                                       r"\(80, 512\).*multiple of 32 or 80"):
    _pallas.check_tpu_blocks([("codes", (40, 256), (80, 512), jnp.uint8)])
  with pytest.raises(ValueError, match=r"output block \(8, 64\).*multiple of 128 or 256"):
    _pallas.check_tpu_blocks([("output", (8, 64), (16, 256), jnp.float32)])
  _pallas.check_tpu_blocks([("x", (16, 128), (32, 256), jnp.bfloat16),
                            ("scales", (8, 48), (16, 48), jnp.float32)])     # full last dim


# ----------------------------------------------------------------------------
# whole programs

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64)
TARGETS = r"layers/\d+/(self_attn|mlp)/\w+_proj/kernel"


def _qlora():
  base = llama.init_params(jax.random.key(0), CFG)
  qbase = qz.quantize(base, qz.QuantConfig(format="nf4", block_size=64, double_quant=True,
                                           targets=TARGETS))
  params = lj.init(jax.random.key(1), qbase, lj.LoraConfig(rank=4, alpha=8, targets=TARGETS))
  return params


def test_qlora_training_step_exports_for_every_platform(standard_promotion):
  """A whole QLoRA step (forward, custom_vjp backward, adamw) of the reference Llama:
  the kernels are in the GPU and TPU parts, and the CPU part runs here with the jitted
  step's numbers."""
  params = _qlora()
  adapter, frozen = lj.split(params)
  opt = optax.adamw(1e-2)
  state = opt.init(adapter)
  ids = jax.random.randint(jax.random.key(2), (2, 16), 0, CFG.vocab_size)

  def step(adapter, state, frozen, ids):
    def loss(a):
      logits = lj.implicit(llama.forward)(lj.combine(a, frozen), CFG, ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    value, grads = jax.value_and_grad(loss)(adapter)
    updates, state = opt.update(grads, state, adapter)
    return optax.apply_updates(adapter, updates), state, value

  exp = export_for(step, adapter, state, frozen, ids)
  assert {TRITON, MOSAIC} <= custom_calls(exp)
  got = exp.call(adapter, state, frozen, ids)
  want = jax.jit(step)(adapter, state, frozen, ids)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got[0], want[0])


def _filled_adapter(base, seed, rank):
  p = lj.init(jax.random.key(seed), base, lj.LoraConfig(rank=rank, alpha=8, targets=TARGETS))

  def fill(x):               # b = 0 would make every adapter the base
    if isinstance(x, lj.LoraWeight):
      b = 0.2 * jax.random.normal(jax.random.key(100 + seed), x.b.shape)
      return lj.LoraWeight(w=x.w, a=x.a, b=b, scale=x.scale, axes=x.axes)
    return x
  return jax.tree.map(fill, p, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def test_multi_lora_decode_step_exports_for_every_platform():
  """Greedy decoding of a mixed batch (per-row adapters over the NF4 base, KV cache):
  the gather rule and the kernels lower for every platform."""
  base = llama.init_params(jax.random.key(0), CFG)
  qbase = qz.quantize(base, qz.QuantConfig(format="nf4", block_size=64, double_quant=True,
                                           targets=TARGETS))
  ads = [_filled_adapter(qbase, s, r) for s, r in [(3, 2), (4, 4)]]
  served = lj.with_adapter_ids(lj.stack_adapters(ads), jnp.array([1, -1, 0]))
  prompt = jax.random.randint(jax.random.key(5), (3, 6), 1, CFG.vocab_size)
  gen = lambda served, prompt: llama.generate(served, CFG, prompt, 2)      # noqa: E731
  exp = export_for(gen, served, prompt)
  assert {TRITON, MOSAIC} <= custom_calls(exp)
  # (that each row equals its adapter alone is tests/test_serving.py's)
  np.testing.assert_array_equal(exp.call(served, prompt), jax.jit(gen)(served, prompt))


def _score_dots(exp) -> set[str]:
  """Result types of the dots that make (query x key) scores, 32 x 32 here."""
  types = re.findall(r"stablehlo.dot_general[^\n]*-> (tensor<[^>]*>)", exp.mlir_module())
  return {t for t in types if t[len("tensor<"):].split("x").count("32") == 2}


def test_attention_per_platform(standard_promotion):
  """CPU keeps our XLA attention (GQA as repeated key/value heads: (B, 4 heads, T, S)
  scores, XLA:CPU's fastest form); CUDA and TPU get `jax.nn.dot_product_attention`
  (grouped heads, (B, 2 kv heads, T, 2 groups, S) scores, no repeat); one exported
  program holds both and runs its CPU part here with the jitted numbers."""
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        llama.init_params(jax.random.key(0), cfg))
  ids = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)
  fwd = lambda p, ids: llama.forward(p, cfg, ids)                # noqa: E731
  ours, grouped = "tensor<2x4x32x32xbf16>", "tensor<2x2x32x2x32xbf16>"
  assert ours in _score_dots(export_for(fwd, params, ids, platforms=("cpu",)))
  assert grouped not in _score_dots(export_for(fwd, params, ids, platforms=("cpu",)))
  for accelerator in ("cuda", "tpu"):
    dots = _score_dots(export_for(fwd, params, ids, platforms=(accelerator,)))
    assert grouped in dots and ours not in dots
  exp = export_for(fwd, params, ids)
  assert {ours, grouped} <= _score_dots(exp)
  assert not custom_calls(exp)                  # GPU_ATTENTION = "xla": no cuDNN call
  np.testing.assert_array_equal(np.asarray(exp.call(params, ids), np.float32),
                                np.asarray(jax.jit(fwd)(params, ids), np.float32))


def test_accelerator_attention_equals_ours(standard_promotion):
  """The GPU/TPU implementation, run here: same values and gradients as the CPU one,
  with GQA, padding and a packed row (a query that sees no key gets padding either way,
  so those rows are left out)."""
  from lora_jax.models import decoder
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
  B, T = 2, 24
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (B, T, 4, 16))
  k, v = (jax.random.normal(kk, (B, T, 2, 16)) for kk in ks[1:])
  seg = jnp.array([[1] * 10 + [2] * 14, [0] * 5 + [1] * 19])           # packed; left pad
  causal = jnp.tril(jnp.ones((T, T), bool))
  mask = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  impls = decoder._attention_impls(decoder._AttnSettings(cfg, True))
  seen = np.asarray(seg > 0)
  w = jax.random.normal(jax.random.key(9), (B, T, 64)) * jnp.asarray(seen)[..., None]

  def loss(impl, q, k, v):
    return jnp.sum(impl(q, k, v, mask) * w)
  for name in ("cuda", "tpu"):
    got, want = impls[name](q, k, v, mask), impls["cpu"](q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen],
                               rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda *a: loss(impls[name], *a), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: loss(impls["cpu"], *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_gradients_through_the_per_platform_call():
  """Training differentiates the per-platform attention (a custom VJP whose backward
  is each platform's own): the gradients equal those of the XLA attention."""
  from lora_jax.models import decoder
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (2, 16, 4, 16))
  k, v = (jax.random.normal(kk, (2, 16, 2, 16)) for kk in ks[1:])
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), bool)), (2, 16, 16))
  f = lambda q, k, v: jnp.sum(jnp.sin(decoder._attention(cfg, q, k, v, mask, True)))  # noqa
  g = lambda q, k, v: jnp.sum(jnp.sin(decoder._attention_xla(cfg, q, k, v, mask, True)))  # noqa
  for a, b in zip(jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# the device benchmark script, checked here in the interpreter

def test_device_benchmark_script_refuses_cpu_and_checks_its_outputs():
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(root)}
  cmd = [sys.executable, str(root / "benchmarks" / "qmatmul.py"), "--device"]
  refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and "no GPU or TPU here" in refused.stderr
  small = ["--allow-cpu", "--shapes", "100x64", "--batches", "1", "16",
           "--formats", "nf4", "int8", "--reps", "1", "--copy-mib", "4"]
  run = subprocess.run(cmd + small, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  rows = [line for line in run.stdout.splitlines() if line.startswith("100x64")]
  assert len(rows) == 4                     # 2 formats x 2 batches
  assert all(float(r.split()[-1]) < 3e-2 for r in rows)     # max rel err column
  assert "outputs agree: yes" in run.stdout and "copy bandwidth" in run.stdout
