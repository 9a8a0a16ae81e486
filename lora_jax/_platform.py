"""`per_platform`: one traced call whose implementation is chosen per target platform
when the program is lowered, not when it is traced.

`jax.default_backend()` at trace time is the wrong question for a program traced on
one platform and run on another (AOT compilation, `jax.export` for GPU/TPU from a CPU
host, a CPU host driving accelerators). `lax.platform_dependent` answers the right one,
but in a multi-platform lowering (`jax.export(f, platforms=("cpu", "cuda", "tpu"))`)
it lowers every branch for every platform (jax 0.10.2), and a compiled `pallas_call`
or a cuDNN call has no CPU lowering, so the export fails. Here each implementation is
the lowering rule of one primitive for its own platform (`mlir.lower_per_platform`
gives each rule only its platforms), so each is lowered for its platform alone.

The call is not differentiable by itself (it has no JVP): put it inside a
`jax.custom_vjp` whose forward and backward are each a `per_platform` call.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.extend as jex
from jax.interpreters import batching, mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

_per_platform_p = jex.core.Primitive("lora_jax_per_platform")
_per_platform_p.multiple_results = True


class _Impls:
  """The per-platform callables, a primitive parameter (hashed by identity)."""

  def __init__(self, table: Mapping[str, Callable]):
    self.table = dict(table)

  def __call__(self, platform: str) -> Callable:
    return self.table[platform]


def per_platform(impls: Mapping[str, Callable], *args: Any) -> Any:
  """`impls[p](*args)` for the platform p the program is lowered for.

  Args:
    impls: callables keyed by "cpu", "cuda", "rocm", "tpu" (each missing platform
      takes "default", which must be given when any is missing). Each returns the
      same pytree of shapes and dtypes, given pytrees of arrays `args`.
    *args: pytrees of arrays.

  Returns:
    What the implementation for the lowering platform returns. Eagerly, the call is
    jitted for the default device.
  """
  table = {p: impls.get(p, impls.get("default")) for p in PLATFORMS}
  missing = [p for p, f in table.items() if f is None]
  if missing:
    raise ValueError(f"per_platform: no implementation for {missing} and no 'default'; "
                     f"given: {sorted(impls)}")
  leaves, in_tree = jax.tree.flatten(args)
  out_tree = None

  def cpu_flat(*leaves):
    nonlocal out_tree
    out, out_tree = jax.tree.flatten(table["cpu"](*jax.tree.unflatten(in_tree, leaves)))
    return out
  # The CPU implementation, traced now, is a parameter: jaxpr walkers and printers see
  # what runs on CPU, and it is what the CPU lowering lowers.
  cpu_jaxpr = jax.make_jaxpr(cpu_flat)(*leaves)
  out = _per_platform_p.bind(*leaves, impls=_Impls(table), in_tree=in_tree,
                             out_tree=out_tree, cpu_jaxpr=cpu_jaxpr)
  return jax.tree.unflatten(out_tree, out)


def _flat_call(platform, *leaves, impls, in_tree, out_tree, cpu_jaxpr):
  out = impls(platform)(*jax.tree.unflatten(in_tree, leaves))
  flat, tree = jax.tree.flatten(out)
  if tree != out_tree:
    raise ValueError(f"per_platform: the {platform} implementation returns {tree}, the cpu "
                     f"one {out_tree}")
  return flat


def _abstract(*leaves, cpu_jaxpr, **params):
  return list(cpu_jaxpr.out_avals)


def _impl(*leaves, **params):
  return jax.jit(lambda *a: _per_platform_p.bind(*a, **params))(*leaves)


def _batch(args, dims, *, impls, in_tree, out_tree, cpu_jaxpr):
  """vmap: each platform's implementation vmapped over the same axes."""
  in_axes = jax.tree.unflatten(in_tree, list(dims))      # None: not mapped
  vmapped = {p: jax.vmap(impls(p), in_axes=tuple(in_axes), out_axes=0) for p in PLATFORMS}
  out = per_platform(vmapped, *jax.tree.unflatten(in_tree, list(args)))
  flat = jax.tree.leaves(out)
  return flat, [0] * len(flat)


def _rule(platform: str):
  def lower(ctx, *args, **params):
    if platform == "cpu":
      fn = jex.core.jaxpr_as_fun(params["cpu_jaxpr"])
    else:
      fn = lambda *a: _flat_call(platform, *a, **params)  # noqa: E731
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
  return lower


_per_platform_p.def_abstract_eval(_abstract)
_per_platform_p.def_impl(_impl)
batching.primitive_batchers[_per_platform_p] = _batch
for _platform in PLATFORMS:
  mlir.register_lowering(_per_platform_p, _rule(_platform), platform=_platform)
