"""One process of a 2-process JAX run on localhost (launched by test_multiprocess.py).

Builds a LoRA'd MLP, then the same on an NF4-quantized base (QLoRA), whose kernels,
packed codes and batch are sharded over a global mesh spanning both processes; runs a
jitted `lj.implicit` forward and an adapter gradient, and checks both against the
materialized reference computed on each host's full copy."""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                           local_device_ids=None)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS  # noqa: E402

import lora_jax as lj  # noqa: E402
import quantization as qz  # noqa: E402


def main(quantized: bool):
  assert jax.process_count() == nproc, jax.process_count()
  devices = np.array(jax.devices()).reshape(nproc, -1)   # (data, model)
  mesh = Mesh(devices, ("data", "model"))
  key = jax.random.key(0)    # same on every process: every host holds the full values
  ks = jax.random.split(key, 4)
  base = {"up": jax.random.normal(ks[0], (64, 128)) / 8,
          "down": jax.random.normal(ks[1], (128, 64)) / 12}
  if quantized:   # block 32: the row-parallel down kernel splits its 4 blocks 2 ways
    base = qz.quantize(base, qz.QuantConfig("nf4", 32, double_quant=True))
  p = lj.init(key, base, lj.LoraConfig(rank=4, alpha=8, targets="up|down"))
  p = {k: lj.LoraWeight(w=v.w, a=v.a, b=0.1 * jax.random.normal(ks[2], v.b.shape), scale=v.scale,
                        axes=v.axes) for k, v in p.items()}
  x = jax.random.normal(ks[3], (8, 64))

  def f(prm, x):
    return jnp.tanh(x @ prm["up"]) @ prm["down"]

  # the dense layout (column- then row-parallel); lj.named_shardings carries it to a, b
  shardings = lj.named_shardings(p, mesh, [("up", PS(None, "model")), ("down", PS("model", None))])
  assert shardings["up"].a.spec == PS(None, None) and shardings["down"].a.spec == PS("model", None)
  if quantized:   # packed codes are stored (out, in/2): the "model" split moves to axis 1
    assert shardings["down"].w.codes.spec == PS(None, "model")
  to_global = lambda v, s: jax.make_array_from_callback(  # noqa: E731
      v.shape, s, lambda idx: np.asarray(v)[idx])
  gp = jax.tree.map(to_global, p, shardings)
  gx = to_global(x, NamedSharding(mesh, PS("data", None)))

  y = jax.jit(lj.implicit(f), out_shardings=NamedSharding(mesh, PS("data", None)))(gp, gx)
  adapter, frozen = lj.split(gp)
  # global arrays spanning other processes must be arguments, not closed-over constants
  loss = lambda ad, fr, x: jnp.sum(lj.implicit(f)(lj.combine(ad, fr), x) ** 2)  # noqa: E731
  g = jax.jit(jax.grad(loss))(adapter, frozen, gx)

  y_full = multihost_utils.process_allgather(y, tiled=True)
  g_full = jax.tree.map(lambda t: multihost_utils.process_allgather(t, tiled=True), g)
  want = f(lj.merge(p), x)
  ad0, fr0 = lj.split(p)
  g_want = jax.grad(lambda ad: jnp.sum(f(lj.merge(lj.combine(ad, fr0)), x) ** 2))(ad0)
  np.testing.assert_allclose(np.asarray(y_full), np.asarray(want), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  kind = "qlora" if quantized else "lora"
  print(f"process {pid}: ok ({kind}), {len(jax.devices())} global devices, "
        f"{len(y.addressable_shards)} local shards")


if __name__ == "__main__":
  main(quantized=False)
  main(quantized=True)
  jax.distributed.shutdown()
