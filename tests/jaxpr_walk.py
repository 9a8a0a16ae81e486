"""Walk a jaxpr and all its inner jaxprs (jit, scan, remat, custom_vjp, ...)."""

import jax


def dot_output_shapes(closed_jaxpr):
  """Output shapes of every dot_general, including those in inner jaxprs."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        shapes.append(tuple(eqn.outvars[0].aval.shape))
      for v in eqn.params.values():
        for j in (v if isinstance(v, (tuple, list)) else [v]):
          if isinstance(j, jax.extend.core.ClosedJaxpr):
            walk(j.jaxpr)
          elif isinstance(j, jax.extend.core.Jaxpr):
            walk(j)
  walk(closed_jaxpr.jaxpr)
  return shapes
