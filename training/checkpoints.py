"""Training checkpoints with orbax: adapter, optimizer state, step and data position.

`Manager` wraps `orbax.checkpoint.CheckpointManager` with two items per step: `state`
(the adapter and optimizer state, a pytree of arrays, restored onto whatever sharding
the caller's abstract tree carries, so a run can continue on another mesh) and `meta`
(JSON: step, data position and the settings the position depends on). Orbax writes each
step under a temporary name and renames it into place, so a `kill -9` mid-save leaves
the previous step intact; saves here are synchronous (the run's next step does not
race a write in flight).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

# settings the saved data position is only meaningful under
POSITION_KEYS = ("seed", "batch_size", "grad_accum", "seq_len", "rows")


class Manager:
  def __init__(self, directory: str | pathlib.Path, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                        enable_async_checkpointing=False)
    self._m = ocp.CheckpointManager(self.directory, options=opts,
                                    item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._m.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._m.all_steps())

  def save(self, step: int, adapter, opt_state, meta: Mapping[str, Any]) -> None:
    self._m.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave({"adapter": adapter, "opt_state": opt_state}),
        meta=ocp.args.JsonSave(dict(meta))))
    self._m.wait_until_finished()

  def restore(self, step: int, adapter, opt_state) -> tuple[Any, Any, dict]:
    """The saved adapter and optimizer state, placed as `adapter` / `opt_state`
    (concrete arrays or `jax.ShapeDtypeStruct`s with shardings) are; and the meta."""
    target = jax.tree.map(_abstract, {"adapter": adapter, "opt_state": opt_state})
    got = self._m.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return got["state"]["adapter"], got["state"]["opt_state"], dict(got["meta"])

  def close(self) -> None:
    self._m.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def check_compatible(meta: Mapping[str, Any], c, rows: int, where: str) -> None:
  """A checkpoint's data position under other data settings (or other data: another
  number of packed rows) would silently train on other batches: refuse, naming it."""
  now = {"seed": c.seed, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
         "seq_len": c.seq_len, "rows": rows}
  for k, v in now.items():
    if k in meta and meta[k] != v:
      raise ValueError(f"{where}: the checkpoint was written with {k}={meta[k]!r}, the "
                       f"config now says {v!r}; resuming would not continue the same data "
                       "order (use another output_dir, or resume: false)")


__all__ = ["Manager", "check_compatible", "POSITION_KEYS"]
