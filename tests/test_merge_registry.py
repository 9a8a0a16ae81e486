"""The merge-method registry: one declaration per method drives `mg.<method>`,
`mg.merge`, `mg.METHODS`, the YAML planner/validator and the README table."""

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging as mg
from merging import _registry, cli
from test_merge_helpers import ROOT, tiny_ckpt, write_yaml

KEY = jax.random.key(0)


def tree(seed, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  return {"embed": jnp.asarray(r.normal(size=(4, 6)), dtype),
          "layers": [{"k": jnp.asarray(r.normal(size=(6, 6)), dtype)} for _ in range(2)]}


def test_every_method_is_one_registry_entry():
  for name, m in mg.METHODS.items():
    assert isinstance(m, mg.Method) and m.name == name
    assert getattr(mg, name) is m.fn, name            # mg.<name> is the generated tree fn
    assert m.base in ("required", "optional", "none")
    assert callable(m.tensor) and m.reference.startswith("https://")
    for p in m.params.values():
      assert p.describe() in m.fn.__doc__             # docstring lists every parameter
  assert mg.MethodInfo is mg.Method


def test_tree_signatures_keep_their_public_form():
  sig = {n: str(inspect.signature(mg.METHODS[n].fn)) for n in mg.METHODS}
  assert sig["ties"].startswith("(models, base, weights=None, *, density=1.0, lambda_=1.0")
  assert sig["slerp"].startswith("(a, b, t, *, dot_threshold=0.9995")
  assert sig["linear"].startswith("(models, weights=None, *, normalize=True")
  assert sig["nuslerp"].startswith("(models, base=None, weights=None, *, row_wise=False")
  assert sig["passthrough"].startswith("(model, scale=None")
  assert sig["nearswap"].startswith("(base, model, t")
  assert "key=None" in sig["dare_ties"] and "key=" not in sig["ties"]
  assert "gamma=0.01" in sig["breadcrumbs"] and "gamma" not in sig["ties"]
  assert "epsilon=0.15" in sig["della"]


def test_defaults_are_declared_once():
  # the task-vector family's gamma / epsilon / lambda defaults: one declaration
  src = open(os.path.join(ROOT, "merging", "_methods.py")).read()
  assert src.count("0.01") == 1 and src.count("0.15") == 1
  cli_src = open(os.path.join(ROOT, "merging", "cli.py")).read()
  for name in mg.METHODS:     # no method name in the command line's code
    assert f'"{name}"' not in cli_src and f"'{name}'" not in cli_src, name
  assert mg.METHODS["breadcrumbs"].params["gamma"].default == 0.01
  assert mg.METHODS["della"].params["epsilon"].default == 0.15
  assert mg.METHODS["ties"].params["normalize"].default is True
  assert mg.METHODS["dare_ties"].params["rescale"].default is True


def test_readme_method_table_is_the_registry():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  assert mg.method_table() in text, "README table is stale: paste mg.method_table()"


def test_adding_a_method_is_one_registered_function(tmp_path, capsys):
  """A new method: one decorated function; the API, mg.merge, the YAML validator and
  planner and the table all pick it up."""
  try:
    @mg.method("scaled_mean", reference="https://example.org/scaled-mean", base="none")
    def _scaled_mean(base, models, *, scale: float = mg.P(1.0, lo=0, hi=10)):
      """Mean of the models times `scale`."""
      return (sum(m.astype(jnp.float32) for m in models) * (scale / len(models))).astype(
          models[0].dtype)

    a, b = tree(0), tree(1)
    out = mg.merge("scaled_mean", [a, b], scale=2.0)
    np.testing.assert_allclose(out["embed"], a["embed"] + b["embed"], rtol=1e-6)
    assert str(inspect.signature(mg.METHODS["scaled_mean"].fn)) == (
        "(models, *, scale=1.0, arithmetic='float32')")
    with pytest.raises(ValueError, match=r"'scale' must be in \[0, 10\], got 11"):
      mg.METHODS["scaled_mean"].fn([a, b], scale=11)
    with pytest.raises(TypeError, match=r"unknown parameter.*'scal'.*did you mean 'scale'"):
      mg.merge("scaled_mean", [a, b], scal=2.0)
    assert "`scaled_mean`" in mg.method_table()
    # the command line, with no change to it
    m0, m1 = tiny_ckpt(tmp_path / "m0", 0), tiny_ckpt(tmp_path / "m1", 1)
    cfg = {"merge_method": "scaled_mean", "parameters": {"scale": 2.0},
           "models": [{"model": m0}, {"model": m1}]}
    assert cli.main(["merge", write_yaml(tmp_path / "c.yml", cfg), str(tmp_path / "o"),
                     "--quiet"]) == 0
    from safetensors.numpy import load_file
    o = load_file(str(tmp_path / "o" / "model.safetensors"))
    x0, x1 = (load_file(os.path.join(d, "model.safetensors")) for d in (m0, m1))
    for k in o:
      np.testing.assert_allclose(o[k], x0[k] + x1[k], rtol=1e-6, err_msg=k)
    cfg["parameters"] = {"scael": 2.0}
    assert cli.main(["merge", write_yaml(tmp_path / "c.yml", cfg), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "parameters: unknown parameter(s) ['scael']" in err and "scale: float in [0, 10]" in err
  finally:
    mg.METHODS.pop("scaled_mean", None)


def test_yaml_and_python_names():
  a, b, base = tree(0), tree(1), tree(2)
  r1 = mg.task_arithmetic([a, b], base, [0.5, 0.5], lambda_=0.7)
  r2 = mg.merge("task_arithmetic", [a, b], base, weight=mg.PerModel([0.5, 0.5]), **{"lambda": 0.7})
  jax.tree.map(np.testing.assert_array_equal, r1, r2)
  r3 = mg.nuslerp([a, b], weights=[1, 3], nuslerp_flatten=False)
  r4 = mg.nuslerp([a, b], weights=[1, 3], flatten=False)
  jax.tree.map(np.testing.assert_array_equal, r3, r4)
  with pytest.raises(TypeError, match="given twice"):
    mg.task_arithmetic([a], base, lambda_=0.5, **{"lambda": 0.5})


def test_python_checks_the_cli_ranges():
  a, b, base = tree(0), tree(1), tree(2)
  for fn, kw, msg in [
      (mg.ties, dict(density=1.5), r"'density' must be in \[0, 1\], got 1.5"),
      (mg.ties, dict(density=-0.1), r"'density' must be in \[0, 1\], got -0.1"),
      (mg.dare_ties, dict(density=2.0, key=KEY), r"'density' must be in \[0, 1\]"),
      (mg.breadcrumbs, dict(density=0.5, gamma=1.2), r"'gamma' must be in \[0, 1\]"),
      (mg.della, dict(density=0.5, epsilon=-0.1, key=KEY), r"'epsilon' must be in \[0, 1\]"),
  ]:
    with pytest.raises(ValueError, match=msg):
      fn([a, b], base, [1, 1], **kw)
  with pytest.raises(ValueError, match=r"'t' must be in \[0, 1\], got 1.5"):
    mg.slerp(a, b, t=1.5)
  with pytest.raises(ValueError, match=r"t\['layers/1/\.\*'\]: parameter 't' must be in "
                                       r"\[0, 1\], got 1.2"):
    mg.slerp(a, b, t={"layers/1/.*": 1.2, ".*": 0.5})    # every value, before any work
  with pytest.raises(ValueError, match=r"embed: parameter 't' has no value for this"):
    mg.slerp(a, b, t={"layers/1/.*": 0.5})   # resolved per leaf, named by path
  with pytest.raises(ValueError, match=r"'t' must be >= 0"):
    mg.nearswap(a, b, t=-1.0)
  with pytest.raises(ValueError, match=r"'max_iter' must be in \[1, 10000\]"):
    mg.karcher([a, b], max_iter=0)
  with pytest.raises(ValueError, match=r"'max_iter' must be an integer"):
    mg.karcher([a, b], max_iter=2.5)
  with pytest.raises(ValueError, match="slerp takes exactly 1 models besides the base, got 2"):
    mg.merge("slerp", [a, b], base=base)
  with pytest.raises(ValueError, match="takes no base model"):
    mg.merge("linear", [a, b], base=base)
  with pytest.raises(ValueError, match="needs a base model"):
    mg.merge("ties", [a, b])


def test_mergekit_arithmetic_python_option():
  a, b, base = (tree(i, jnp.bfloat16) for i in range(3))
  out = mg.ties([a, b], base, [0.6, 0.4], density=0.5, arithmetic="mergekit")
  assert out["embed"].dtype == jnp.bfloat16
  assert not np.array_equal(np.asarray(out["embed"]), np.asarray(
      mg.ties([a, b], base, [0.6, 0.4], density=0.5)["embed"]))   # rounding per operation
  with pytest.raises(ValueError, match="not reproduced for 'model_stock'.*linear.*ties"):
    mg.model_stock([a, b], base, arithmetic="mergekit")
  with pytest.raises(ValueError, match="arithmetic must be one of"):
    mg.linear([a, b], arithmetic="bf16")
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda x, y: mg.linear([x, y], arithmetic="mergekit"))(a, b)


@pytest.mark.interop
def test_mergekit_arithmetic_task_vectors_equal_torch_bf16():
  """Our numpy emulation == mergekit's GTA core run in torch bf16, bit for bit, on
  tensors without magnitude ties (small, distinct values)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("mergekit")
  from mergekit.merge_methods.base import TensorGroup  # noqa: F401  (import check)
  from mergekit.merge_methods.generalized_task_arithmetic import get_mask
  from mergekit import sparsify as msp
  import ml_dtypes
  r = np.random.default_rng(0)
  # deltas with distinct magnitudes (k / 1024, exact in bf16): no ties at the top-k cut,
  # where torch's argsort picks among equal magnitudes in an unspecified order
  base = np.zeros((12, 16), ml_dtypes.bfloat16)     # so m - base is exact
  ms = [(base.astype(np.float32) + (r.permutation(192).reshape(12, 16) + 1) / 1024
         * r.choice([-1, 1], size=(12, 16))).astype(ml_dtypes.bfloat16) for _ in range(3)]
  w, dens = [0.6, 0.3, 0.5], [0.5, 0.3, 0.9]
  tb = torch.from_numpy(base.astype(np.float32)).bfloat16()
  tms = [torch.from_numpy(m.astype(np.float32)).bfloat16() for m in ms]
  deltas = torch.stack([msp.magnitude(m - tb, d) for m, d in zip(tms, dens)])
  wt = torch.tensor(w, dtype=torch.bfloat16)[:, None, None]
  deltas = deltas * wt
  mask = get_mask(deltas, "sum")
  div = (wt * mask).sum(0)
  div[div == 0] = 1
  want = (tb + ((deltas * mask).sum(0) / div) * 0.7).float().numpy()
  got = mg.METHODS["ties"].mergekit(base, tuple(ms), weight=np.float32(w), density=dens,
                                    lambda_=0.7, normalize=True, rescale=False, consensus="sum")
  np.testing.assert_array_equal(got.astype(np.float32), want)


@pytest.mark.interop
def test_arcee_fusion_is_stable_on_near_identical_rows():
  """mergekit's importance cancels in float32 on nearly equal rows; ours agrees with
  mergekit's own formula evaluated in float64 (its intended math), keep for keep."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("mergekit")
  from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance
  r = np.random.default_rng(0)
  base = r.normal(size=(452, 400)).astype(np.float32)
  model = base.copy()
  near = r.random(452) < 0.5
  model[near] += (1e-6 * r.normal(size=(near.sum(), 400))).astype(np.float32)
  model[~near] += (1e-2 * r.normal(size=((~near).sum(), 400))).astype(np.float32)

  def mk_keep(dt):
    tb, tm = torch.from_numpy(base).to(dt), torch.from_numpy(model).to(dt)
    return DynamicThresholdFusion().compute_fusion_mask(
        _compute_importance(tm, tb))[0].numpy().astype(bool)

  intended, mk32 = mk_keep(torch.float64), mk_keep(torch.float32)
  assert (intended != mk32).sum() > 0          # the float32 formula does flip decisions
  out = np.asarray(mg.arcee_fusion({"w": jnp.asarray(base)}, {"w": jnp.asarray(model)})["w"])
  kept = out != base
  np.testing.assert_array_equal(kept, intended & (model != base))
  np.testing.assert_array_equal(out[kept], model[kept])
  # the KL itself: relative accuracy against float64
  from merging._selective import fusion_kl
  tm, tb = torch.from_numpy(model).double(), torch.from_numpy(base).double()
  p, q = torch.softmax(tm, -1) + 1e-8, torch.softmax(tb, -1) + 1e-8
  kl64 = torch.sum(p * torch.log(p / q), -1, keepdim=True).numpy()
  ours = np.asarray(fusion_kl(jnp.asarray(base), jnp.asarray(model)))
  np.testing.assert_allclose(ours, kl64, rtol=1e-2)


DETERMINISTIC = [n for n in sorted(mg.METHODS) if not mg.METHODS[n].random]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_cli_and_python_api_agree(name, tmp_path):
  """One declaration, two front ends: `lora-jax merge` on checkpoints and `mg.merge` on
  the same tensors as a pytree give the same result with the same parameters."""
  from safetensors.numpy import load_file
  m = mg.METHODS[name]
  n = 1 if m.max_models == 1 else 2
  paths = [tiny_ckpt(tmp_path / f"m{i}", i) for i in range(n + 1)]
  trees = [load_file(os.path.join(p, "model.safetensors")) for p in paths]
  params = {}
  if "weight" in m.params:
    params["weight"] = [0.6, 0.4][:n]
  if "t" in m.params:
    params["t"] = 0.3
  models_yaml = [{"model": p, "parameters": {"weight": w}} if "weight" in params else
                 {"model": p} for p, w in zip(paths[1:], params.get("weight", [None] * n))]
  cfg = {"merge_method": name, "models": models_yaml}
  if "t" in params:
    cfg["parameters"] = {"t": params["t"]}
  base = None
  if m.base == "required":
    cfg["base_model"] = paths[0]
    base = trees[0]
  assert cli.main(["merge", write_yaml(tmp_path / "c.yml", cfg), str(tmp_path / "o"),
                   "--quiet"]) == 0
  got = load_file(str(tmp_path / "o" / "model.safetensors"))
  kw = {"weights" if k == "weight" else k: v for k, v in params.items()}
  want = mg.merge(name, trees[1:], base, **kw)
  assert sorted(got) == sorted(want)
  for k in got:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), atol=1e-6, rtol=1e-6, err_msg=k)


def test_dry_run_names_the_arithmetic(tmp_path, capsys):
  m0, m1 = tiny_ckpt(tmp_path / "m0", 0), tiny_ckpt(tmp_path / "m1", 1)
  path = write_yaml(tmp_path / "c.yml", {"merge_method": "ties", "base_model": m0, "models": [
      {"model": m1, "parameters": {"weight": 1.0, "density": 0.5}}]})
  assert cli.main(["merge", path, str(tmp_path / "o"), "--dry-run"]) == 0
  assert "arithmetic: float32" in capsys.readouterr().out
  assert cli.main(["merge", path, str(tmp_path / "o"), "--dry-run", "--mergekit-arithmetic"]) == 0
  assert "arithmetic: mergekit" in capsys.readouterr().out
  assert not (tmp_path / "o").exists()
