"""Merge methods over pytrees: one battery for every registered method, properties,
parameters (values, regex mappings, gradients) and sparsifiers against mergekit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import merging as mg
from merging import _params, _sparsify as sp

KEY = jax.random.key(0)


def tree(seed, dtype=jnp.float32, layers=3, scale=1.0, offset=None):
  r = np.random.default_rng(seed)
  def arr(*shape):
    x = r.normal(size=shape) * scale
    if offset is not None:
      x = offset + 0.1 * x
    return jnp.asarray(x, dtype)
  return {"embed": {"embedding": arr(4, 6)},
          "layers": [{"attn": {"kernel": arr(4, 6)}, "norm": {"scale": arr(6)}}
                     for _ in range(layers)],
          "head": {"kernel": arr(4, 6)},
          "step": jnp.asarray(3, jnp.int32)}


def run(name, models, base=None, **kw):
  """Every registered method with typical parameters."""
  info = mg.METHODS[name]
  n = len(models)
  if name == "slerp":
    return mg.merge(name, models[:1], base, t=kw.get("t", 0.3))
  if name == "passthrough":
    return mg.merge(name, models[:1])
  if name == "nuslerp":
    return mg.merge(name, models[:2], base, weights=[0.4, 0.6])
  if name == "model_stock":
    return mg.merge(name, models, base)
  if name == "linear":
    return mg.merge(name, models, weights=[1.0 + i for i in range(n)])
  if name == "karcher":
    return mg.merge(name, models)
  if name == "multislerp":   # without a base: equal inputs have zero deltas from it
    return mg.merge(name, models, weights=[0.5 + 0.25 * i for i in range(n)])
  if name == "nearswap":
    return mg.merge(name, models[:1], base, t=0.05)
  if name == "sce":
    return mg.merge(name, models, base, select_topk=0.5)
  if name == "arcee_fusion":
    return mg.merge(name, models[:1], base)
  if name in ("ram", "ramplus_tl"):
    return mg.merge(name, models, base, epsilon=1e-3)
  params = dict(weights=[0.7 + 0.1 * i for i in range(n)], density=0.6)
  if info.random:
    params["key"] = KEY
  if "gamma" in info.params:
    params["gamma"] = 0.1
  return mg.merge(name, models, base, **params)


ALL = sorted(mg.METHODS)


def test_registry_has_every_method_with_reference():
  want = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
          "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock",
          "passthrough", "karcher", "multislerp", "nearswap", "sce", "arcee_fusion", "ram",
          "ramplus_tl"}
  assert want <= set(mg.METHODS)
  for name, info in mg.METHODS.items():
    assert info.reference.startswith("https://"), name
    assert callable(info.fn)
  with pytest.raises(ValueError, match="already registered"):
    mg.register(mg.METHODS["ties"])


@pytest.mark.parametrize("name", ALL)
def test_identity_on_equal_inputs(name):
  x = tree(0, layers=2)
  out = run(name, [x, x, x], base=x)
  chex.assert_trees_all_close(out, x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_dtype_kept_and_jit_equals_eager(name):
  b, m1, m2 = (tree(i, jnp.bfloat16, layers=1) for i in range(3))
  eager = run(name, [m1, m2], base=b)
  chex.assert_trees_all_equal_dtypes(eager, b)
  jitted = jax.jit(lambda b, m1, m2: run(name, [m1, m2], base=b))(b, m1, m2)
  chex.assert_trees_all_close(jitted, eager, atol=1e-2)   # one bf16 ulp
  if name != "passthrough":   # the merge really mixes the inputs
    assert not np.array_equal(np.asarray(eager["head"]["kernel"], np.float32),
                              np.asarray(m1["head"]["kernel"], np.float32))


@pytest.mark.parametrize("name", [m for m in ALL if m != "passthrough"])
def test_errors_name_paths(name):
  b, m1 = tree(0), tree(1)
  bad = tree(2)
  bad["layers"][1]["attn"]["kernel"] = jnp.zeros((4, 7))
  with pytest.raises(ValueError, match=r"layers/1/attn/kernel.*\(4, 7\)"):
    run(name, [bad, m1], base=b)
  with pytest.raises(ValueError, match="layers/2"):
    run(name, [tree(3, layers=2), m1], base=b)


def test_ties_matches_reference_math():
  b, m1, m2 = tree(0), tree(1), tree(2)
  out = mg.ties([m1, m2], base=b, weights=[0.6, 0.4], density=0.5)
  x0, x1, x2 = (np.asarray(t["head"]["kernel"], np.float64) for t in (b, m1, m2))
  ds = []
  for x, w in ((x1, 0.6), (x2, 0.4)):
    d = x - x0
    k = int(0.5 * d.size)
    thr = np.sort(np.abs(d).ravel())[::-1][k - 1]
    ds.append(np.where(np.abs(d) >= thr, d, 0) * w)
  D = np.stack(ds)
  elected = np.where(D.sum(0) >= 0, 1, -1)
  mask = np.sign(D) == elected
  div = (np.array([0.6, 0.4])[:, None, None] * mask).sum(0)
  want = x0 + (D * mask).sum(0) / np.where(div == 0, 1, div)
  np.testing.assert_allclose(out["head"]["kernel"], want, atol=1e-5)


def test_task_arithmetic_lambda_and_mapping_weights():
  b, m1, m2 = tree(0), tree(1), tree(2)
  w2 = {r"layers/.*": 0.5, ".*": 0.25}
  out = mg.task_arithmetic([m1, m2], base=b, weights=[1.0, w2], **{"lambda": 0.5})
  for path_fn, w in ((lambda t: t["layers"][0]["attn"]["kernel"], 0.5),
                     (lambda t: t["head"]["kernel"], 0.25)):
    want = path_fn(b) + 0.5 * ((path_fn(m1) - path_fn(b)) + w * (path_fn(m2) - path_fn(b)))
    np.testing.assert_allclose(path_fn(out), want, atol=1e-5)
  assert out["step"] is b["step"]


def test_gradient_over_layers_matches_leafwise_t():
  a, b = tree(0), tree(1)
  out = mg.slerp(a, b, t=[0.0, 1.0])
  for i, t in enumerate([0.0, 0.5, 1.0]):
    want = mg.slerp_leaf(a["layers"][i]["attn"]["kernel"], b["layers"][i]["attn"]["kernel"],
                         np.float32(t))
    np.testing.assert_allclose(out["layers"][i]["attn"]["kernel"], want, atol=1e-6)
  # non-layer leaves get t = 0 (mergekit): they equal `a`
  np.testing.assert_allclose(out["head"]["kernel"], a["head"]["kernel"], atol=1e-6)


def test_per_model_density_and_bad_values():
  b, m1, m2 = tree(0), tree(1), tree(2)
  out = mg.ties([m1, m2], base=b, weights=[1.0, 1.0], density=mg.PerModel([1.0, 0.0]))
  # model 2 pruned to nothing: ties of one full delta with normalize -> m1
  chex.assert_trees_all_close(out["layers"], m1["layers"], atol=1e-6)
  with pytest.raises(ValueError, match="PerModel has 1 values for 2 models"):
    mg.ties([m1, m2], base=b, weights=[1, 1], density=mg.PerModel([0.5]))
  with pytest.raises(ValueError, match="weights: 3 values for 2 models"):
    mg.ties([m1, m2], base=b, weights=[1, 1, 1])
  with pytest.raises(ValueError, match="key=jax.random.key"):
    mg.dare_ties([m1, m2], base=b, weights=[1, 1], density=0.5)
  with pytest.raises(ValueError, match="epsilon"):
    mg.della([m1, m2], base=b, weights=[1, 1], density=0.5, epsilon=0.6, key=KEY)
  with pytest.raises(ValueError, match="sum to 0"):
    mg.linear([m1, m2], weights=[1.0, -1.0])
  with pytest.raises(ValueError, match="unknown merge method 'tie'.*ties"):
    mg.merge("tie", [m1], b)
  with pytest.raises(ValueError, match="exactly 2 models"):
    mg.nuslerp([m1], base=b)
  with pytest.raises(TypeError, match="parameter 't'"):
    mg.slerp(b, m1, t="half")
  with pytest.raises(ValueError, match="no value for this tensor"):
    mg.slerp(b, m1, t={"layers/.*": 0.5})


def test_stack_layers_depth_upscaling():
  m1, m2 = tree(1, layers=4), tree(2, layers=4)
  out = mg.stack_layers([(m1, (0, 3)), (m2, (1, 4))])
  assert len(out["layers"]) == 6
  chex.assert_trees_all_equal(out["layers"][0], m1["layers"][0])
  chex.assert_trees_all_equal(out["layers"][3], m2["layers"][1])
  chex.assert_trees_all_equal(out["embed"], m1["embed"])   # embeddings: first slice
  chex.assert_trees_all_equal(out["head"], m2["head"])     # head, norm: last slice
  with pytest.raises(ValueError, match=r"layer_range \(2, 9\)"):
    mg.stack_layers([(m1, (2, 9))])


def test_dare_statistics_and_expectation():
  x = jax.random.normal(jax.random.key(1), (32, 32))
  # mergekit default: l1 rescale keeps the L1 norm exactly
  y = sp.bernoulli(x, 0.3, jax.random.key(2), "l1")
  np.testing.assert_allclose(jnp.abs(y).sum(), jnp.abs(x).sum(), rtol=1e-5)
  assert abs(float(jnp.mean(y != 0)) - 0.3) < 0.03
  # the paper's 1/density rescale is unbiased: the mean over keys -> x
  keys = jax.random.split(jax.random.key(3), 400)
  mean = jax.jit(jax.vmap(lambda k: sp.bernoulli(x, 0.3, k, "inverse")))(keys).mean(0)
  assert float(jnp.abs(mean - x).mean()) < 0.1 * float(jnp.abs(x).mean())
  # same key, same drop; another key, another drop
  b, m = tree(0), tree(1)
  r1 = mg.dare_linear([m], base=b, weights=[1.0], density=0.5, key=KEY)
  r2 = mg.dare_linear([m], base=b, weights=[1.0], density=0.5, key=KEY)
  r3 = mg.dare_linear([m], base=b, weights=[1.0], density=0.5, key=jax.random.key(9))
  chex.assert_trees_all_equal(r1, r2)
  assert not np.array_equal(r1["head"]["kernel"], r3["head"]["kernel"])


def test_della_probabilities_rank_by_magnitude():
  x = jax.random.normal(jax.random.key(4), (8, 50))
  p = sp.della_probs(x, 0.3, 0.2)
  np.testing.assert_allclose(p.min(1), 0.3, atol=1e-6)
  np.testing.assert_allclose(p.max(1), 0.5, atol=1e-6)
  order = np.argsort(np.abs(np.asarray(x)), axis=1)
  assert np.all(np.diff(np.take_along_axis(np.asarray(p), order, 1), axis=1) > 0)


def test_topk_mask_exact_count_with_ties():
  x = jnp.asarray([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 5.0])
  for k in range(8):
    m = sp.topk_mask(x, k)
    assert int(m.sum()) == k
    kept = np.sort(np.asarray(x)[np.asarray(m)])[::-1]
    np.testing.assert_array_equal(kept, np.sort(np.asarray(x))[::-1][:k])


# ---------------------------------------------------------------------------
# properties

small = st.integers(min_value=1, max_value=5)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(ALL), st.integers(2, 4), small, small, st.integers(0, 10_000))
def test_property_copies_give_the_model(name, n, rows, cols, seed):
  x = {"a": jnp.asarray(np.random.default_rng(seed).normal(size=(rows, cols)), jnp.float32),
       "layers": [{"k": jnp.asarray(np.random.default_rng(seed + 1).normal(size=(cols,)),
                                    jnp.float32)}]}
  out = run(name, [x] * n, base=x)
  chex.assert_trees_all_close(out, x, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4), st.floats(-3, 3))
def test_property_weights_summing_to_one_keep_constant(ws, c):
  ws = [w / sum(ws) for w in ws]
  x = {"w": jnp.full((3, 4), c, jnp.float32)}
  out = mg.linear([x] * len(ws), weights=ws, normalize=False)
  np.testing.assert_allclose(out["w"], c, atol=1e-5)
  out = mg.task_arithmetic([x] * len(ws), base=x, weights=ws)
  np.testing.assert_allclose(out["w"], c, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_property_slerp_ends(seed, parallel):
  r = np.random.default_rng(seed)
  a = jnp.asarray(r.normal(size=(5, 3)), jnp.float32)
  b = 2.5 * a if parallel else jnp.asarray(r.normal(size=(5, 3)), jnp.float32)
  np.testing.assert_allclose(mg.slerp({"w": a}, {"w": b}, t=0.0)["w"], a, atol=1e-5)
  np.testing.assert_allclose(mg.slerp({"w": a}, {"w": b}, t=1.0)["w"], b, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------
# against mergekit's own functions, at test time

@pytest.mark.interop
@pytest.mark.slow
def test_sparsifiers_and_interpolations_match_mergekit():
  torch = pytest.importorskip("torch")
  pytest.importorskip("mergekit")
  from mergekit import sparsify as msp
  from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp
  from mergekit.merge_methods.slerp import slerp as mk_slerp

  r = np.random.default_rng(0)
  x = r.normal(size=(16, 24)).astype(np.float32)
  tx = torch.from_numpy(x)
  magnitude = jax.jit(sp.magnitude, static_argnames="rescale")   # one compile: k is traced
  outliers = jax.jit(sp.magnitude_outliers)
  for d in (0.0, 0.01, 0.3, 0.5, 0.99, 1.0):
    for rescale in (None, "l1"):
      want = msp.magnitude(tx, d, msp.RescaleNorm.l1 if rescale else None).numpy()
      got = magnitude(jnp.asarray(x), sp.magnitude_k(x.size, d), rescale)
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"magnitude {d} {rescale}")
    for g in (0.0, 0.05, 0.2):
      want = msp.magnitude_outliers(tx, d, None, gamma=g).numpy()
      kt, dt = sp.outlier_counts(x.size, d, g)
      got = outliers(jnp.asarray(x), kt, dt)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"outliers {d} {g}")
  y = r.normal(size=(16, 24)).astype(np.float32)
  for other in (y, 3 * x, -x):
    for t in (0.0, 0.3, 1.0):
      want = mk_slerp(torch.tensor([t]), tx[None], torch.from_numpy(other)[None])[0].numpy()
      np.testing.assert_allclose(mg.slerp_leaf(x, other, np.float32(t)), want, atol=1e-6)
  for flatten, row_wise in ((True, False), (False, False), (False, True)):
    want = mk_nuslerp(0.3, tx, torch.from_numpy(y), dim=0 if row_wise else -1,
                      flatten=flatten).numpy()
    got = mg.nuslerp_leaf(x, y, np.float32(0.3), row_wise=row_wise, flatten=flatten)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.interop
def test_gradient_interpolation_matches_mergekit():
  pytest.importorskip("mergekit")
  from mergekit.config import evaluate_setting
  for setting in ([0.0, 1.0], [0.2, 0.9, 0.4], [1, 0.5, 0.7, 0.3, 0]):
    for t in np.linspace(0, 1, 9):
      want = evaluate_setting("x", setting, float(t), validate=float)
      assert _params.resolve(setting, "x", float(t)) == pytest.approx(want, abs=1e-12)
  cond = _params.from_yaml([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}])
  assert _params.resolve(cond, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.25
  assert _params.resolve(cond, "model.layers.1.mlp.up_proj.weight", 0.25) == 0.5


@pytest.mark.parametrize("sparsify,rescale", [
    (None, None), ("magnitude", None), ("magnitude", "l1"), ("magnitude_outliers", None),
    ("random", "l1"), ("random", "inverse"), ("random", None)])
def test_two_phase_core_equals_dense_reference(sparsify, rescale):
  """The eager two-phase task-vector core == the one-pass reference."""
  r = np.random.default_rng(0)
  base = jnp.asarray(r.normal(size=(12, 9)), jnp.float32)
  models = tuple(jnp.asarray(r.normal(size=(12, 9)), jnp.float32) for _ in range(3))
  w = np.array([0.5, 0.3, 0.9], np.float32)
  args = mg._methods.sparse_args_for(sparsify, base.size, [0.5, 0.3, 0.8], [0.1] * 3, [0.1] * 3)
  keys = jax.random.split(KEY, 3)
  for consensus, normalize in ((None, False), ("sum", True), ("count", True)):
    kw = dict(sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale)
    got = mg.task_vector_leaf(base, models, w, np.float32(0.7), args, keys, **kw)
    want = mg._methods.task_vector_leaf_dense(base, models, w, np.float32(0.7), args, keys, **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
