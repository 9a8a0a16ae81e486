"""The public seam for leaf authors and for the packages built on `lora_jax`.

A new leaf kind (a quantized format, an adapter variant) is one class, its rules and
its test factory:

    from typing import Any
    import jax.numpy as jnp
    from jax.extend.core import primitives as P
    import lora_jax as lj
    from lora_jax import extend

    class ScaledWeight(lj.ImplicitArray):          # W * s, s trainable per column
      w: Any = extend.base()
      s: Any = extend.trainable()

      shape = property(lambda self: self.w.shape)
      dtype = property(lambda self: self.w.dtype)

      def materialize(self):
        return self.w * self.s

    @extend.register_dot_rule(ScaledWeight)        # written once, leaf on the right
    def _dot(prim, x, leaf, *, dimension_numbers, **params):
      ...

`quantization`, `merging`, `training` and `serving` import only public names: these and
`lora_jax`'s own. For serving engines: `served_form(tree)` (every leaf in the plain
LoRA / DoRA form a `MultiLoraWeight` bank holds: IEC and QA-LoRA as their exact LoRA)
and `serving_magnitude(leaf)` (DoRA's fixed per-column factor `m / ||W + s A B||`, 1 for
LoRA). For kernel authors: `per_platform({"cpu": f, "cuda": g, "tpu": h}, *args)`, one
call lowered per target platform (a Pallas kernel on GPU/TPU, XLA on CPU), right in
AOT compilation and in a multi-platform `jax.export`.
"""

from lora_jax._implicit import (ImplicitArray, LeafCount, base, bind, data, frozen, implicit,
                                is_implicit, materialize, materialize_tree, register_dot_rule,
                                register_rule, static, trainable)
from lora_jax._extract import svd_factors
from lora_jax._fingerprint import base_fingerprint
from lora_jax._inits import mutating_factors
from lora_jax._paths import (check_same_structure, closest_paths, compile_patterns, first_match,
                             leaves_with_paths, map_with_path, path_str, select_paths,
                             tree_paths)
from lora_jax._sharding import child_spec, implicit_spec_parts
from lora_jax._serving import _magnitude_factor as serving_magnitude  # noqa: F401
from lora_jax._serving import _served_form as served_form  # noqa: F401
from lora_jax._platform import PLATFORMS, per_platform


def is_float_kernel(x) -> bool:
  """A plain (not implicit) floating array with at least 2 axes: what LoRA, quantization
  and the merge methods take as a weight matrix (leading axes are stacked layers)."""
  import jax.numpy as jnp
  return (not is_implicit(x) and hasattr(x, "shape") and hasattr(x, "dtype")
          and not isinstance(x, bool) and jnp.issubdtype(x.dtype, jnp.floating)
          and len(x.shape) >= 2)


__all__ = [
    "ImplicitArray", "LeafCount", "base", "frozen", "trainable", "data", "static",
    "register_rule", "register_dot_rule", "bind", "implicit", "is_implicit", "materialize",
    "materialize_tree", "check_same_structure", "closest_paths", "compile_patterns",
    "first_match", "leaves_with_paths", "map_with_path", "path_str", "select_paths",
    "tree_paths", "child_spec", "implicit_spec_parts", "mutating_factors", "is_float_kernel", "base_fingerprint", "svd_factors",
    "served_form", "serving_magnitude", "PLATFORMS", "per_platform",
]
