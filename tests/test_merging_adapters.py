"""Adapter merges (`mg.merge_adapters`) against PEFT's `add_weighted_adapter` and the
delta math, and `lj.extract_lora` against mergekit's LoRA extraction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
import merging as mg
from lora_jax._extract import extract_lora


def lw(seed, shape=(8, 6), r=2, scale=2.0, w=None, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(k[0], shape, dtype) if w is None else w
  return lj.LoraWeight(w, jax.random.normal(k[1], (*shape[:-1], r), dtype),
                       jax.random.normal(k[2], (r, shape[-1]), dtype), scale=scale)


def delta(x):
  return np.asarray(x.a, np.float64).reshape(-1, x.rank) @ np.asarray(
      x.b, np.float64).reshape(x.rank, -1) * x.scale


# ---------------------------------------------------------------------------
# the delta math

def test_cat_is_the_exact_weighted_sum_and_linear_is_not():
  w = jax.random.normal(jax.random.key(0), (8, 6))
  ads = [{"q": lw(1, r=2, w=w), "n": jnp.ones(3)}, {"q": lw(2, r=2, scale=0.5, w=w),
                                                    "n": jnp.ones(3)}]
  ws = [0.7, -0.4]
  want = sum(wi * delta(a["q"]) for wi, a in zip(ws, ads))
  cat = mg.merge_adapters(ads, "cat", ws)
  assert cat["q"].rank == 4 and cat["q"].scale == 1.0 and cat["n"] is ads[0]["n"]
  np.testing.assert_allclose(delta(cat["q"]), want, atol=1e-5)
  assert cat["q"].w is w
  # svd at full rank is exact too
  full = mg.merge_adapters(ads, "svd", ws, rank=6)
  np.testing.assert_allclose(delta(full["q"]), want, atol=1e-4)
  # PEFT's factor-wise linear adds the cross terms B_i A_j (here in our a @ b order)
  lin = mg.merge_adapters(ads, "linear", ws)
  s = [np.sign(x) * np.sqrt(abs(x)) for x in (0.7 * 2.0, -0.4 * 0.5)]
  r = [np.sqrt(abs(x)) for x in (0.7 * 2.0, -0.4 * 0.5)]
  A = [np.asarray(a["q"].a, np.float64) for a in ads]
  B = [np.asarray(a["q"].b, np.float64) for a in ads]
  np.testing.assert_allclose(delta(lin["q"]), (s[0] * A[0] + s[1] * A[1]) @ (r[0] * B[0] + r[1] * B[1]),
                             atol=1e-4)
  assert np.abs(delta(lin["q"]) - want).max() > 1e-2


def test_svd_truncation_is_the_best_rank_r_fit():
  w = jnp.zeros((10, 9))
  ads = [{"q": lw(i, (10, 9), r=3, w=w, scale=1.0)} for i in range(3)]
  target = sum(delta(a["q"]) for a in ads)
  out = mg.merge_adapters(ads, "svd", rank=4)["q"]
  assert out.rank == 4
  s = np.linalg.svd(target, compute_uv=False)
  err = np.linalg.norm(delta(out) - target)
  np.testing.assert_allclose(err, np.sqrt((s[4:] ** 2).sum()), rtol=1e-4)


def test_stacked_leaves_merge_per_layer():
  k = jax.random.split(jax.random.key(5), 4)
  mk = lambda i: lj.LoraWeight(jnp.zeros((3, 8, 6)), jax.random.normal(k[i], (3, 8, 2)),
                               jax.random.normal(k[i + 1], (3, 2, 6)), scale=1.0)
  a, b = mk(0), mk(2)
  out = mg.merge_adapters([{"l": a}, {"l": b}], "ties", [1.0, 1.0], density=0.5, rank=6)["l"]
  assert out.a.shape == (3, 8, 6) and out.b.shape == (3, 6, 6)
  for i in range(3):   # per layer == merging the per-layer adapters alone
    one = mg.merge_adapters(
        [{"l": lj.LoraWeight(x.w[i], x.a[i], x.b[i], scale=1.0)} for x in (a, b)],
        "ties", [1.0, 1.0], density=0.5, rank=6)["l"]
    np.testing.assert_allclose(np.asarray(out.a[i] @ out.b[i]), np.asarray(one.a @ one.b),
                               atol=1e-4)


def test_dare_on_full_deltas_statistics():
  w = jnp.zeros((32, 32))
  ads = [{"q": lw(1, (32, 32), r=32, w=w, scale=1.0)}]
  d0 = delta(ads[0]["q"])
  out = mg.merge_adapters(ads * 2, "dare_linear", [0.5, 0.5], density=0.25, rank=32,
                          key=jax.random.key(0))["q"]
  got = delta(out)
  # two independent drops of the same delta, each kept w.p. 0.25 and divided by 0.25
  kept = np.abs(got) > 1e-3 * np.abs(d0).mean()
  frac = kept.mean()
  assert abs(frac - (1 - 0.75 ** 2)) < 0.05
  ratio = got[kept] / d0[kept]
  assert set(np.round(ratio, 2)) <= {2.0, 4.0}


def test_bad_inputs():
  w = jnp.zeros((8, 6))
  a, b = {"q": lw(1, w=w)}, {"q": lw(2, w=w, r=3)}
  with pytest.raises(ValueError, match="unknown method 'mean'.*cat"):
    mg.merge_adapters([a, b], "mean")
  with pytest.raises(ValueError, match="head in adapters\\[1\\] is a fully trained module"):
    mg.merge_adapters([{**a, "head": w}, {**a, "head": lj.Trainable(w)}], "cat")
  with pytest.raises(ValueError, match="q in adapters\\[0\\] is a DoRA weight"):
    mg.merge_adapters([lj.to_dora(a), lj.to_dora(a)], "cat")
  with pytest.raises(ValueError, match="q: method 'linear' .* equal ranks.*\\[2, 3\\]"):
    mg.merge_adapters([a, b], "linear")
  with pytest.raises(ValueError, match="2 weights for 1 adapters"):
    mg.merge_adapters([a], "cat", [1, 2])
  with pytest.raises(ValueError, match="needs density"):
    mg.merge_adapters([a, b], "ties")
  with pytest.raises(ValueError, match="pass key"):
    mg.merge_adapters([a, b], "dare_ties", density=0.5)
  with pytest.raises(ValueError, match=r"q: adapters\[1\] adapts a weight of shape \(8, 7\)"):
    mg.merge_adapters([a, {"q": lw(3, (8, 7))}], "cat")
  with pytest.raises(ValueError, match="structure"):
    mg.merge_adapters([a, {"k": lw(3)}], "cat")
  with pytest.raises(ValueError, match="no LoraWeight"):
    mg.merge_adapters([{"q": w}], "cat")


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.floats(-2, 2), st.floats(0.1, 4)),
                min_size=1, max_size=3), st.integers(0, 1000))
def test_property_cat_equals_sum_of_deltas(specs, seed):
  w = jnp.zeros((5, 4))
  ads = [{"x": lw(seed + i, (5, 4), r=r, scale=s, w=w)} for i, (r, _, s) in enumerate(specs)]
  ws = [x for _, x, _ in specs]
  out = mg.merge_adapters(ads, "cat", ws)["x"]
  want = sum(wi * delta(a["x"]) for wi, a in zip(ws, ads))
  np.testing.assert_allclose(delta(out), want, atol=1e-4)


# ---------------------------------------------------------------------------
# against PEFT at test time

@pytest.fixture(scope="module")
def peft_model():
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.q = torch.nn.Linear(8, 6, bias=False)
      self.v = torch.nn.Linear(6, 8, bias=False)

    def forward(self, x):
      return self.v(self.q(x))

  torch.manual_seed(0)
  model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]),
                              adapter_name="a")
  model.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["q", "v"]))
  model.add_adapter("c", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q", "v"]))
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_" in n:
        p.copy_(torch.randn_like(p))
  return model


def ours(model, name):
  """PEFT adapter `name` as a tree of LoraWeight in our (in, out) layout."""
  tree = {}
  for mod in ("q", "v"):
    layer = getattr(model.base_model.model, mod)
    tree[mod] = lj.LoraWeight(
        jnp.asarray(layer.base_layer.weight.detach().numpy().T),
        jnp.asarray(layer.lora_A[name].weight.detach().numpy().T),
        jnp.asarray(layer.lora_B[name].weight.detach().numpy().T),
        scale=float(layer.scaling[name]))
  return tree


def peft_delta(model, name, mod):
  layer = getattr(model.base_model.model, mod)
  return layer.get_delta_weight(name).detach().numpy().T.astype(np.float64)


@pytest.mark.interop
@pytest.mark.parametrize("ours_method,peft_method,names", [
    ("cat", "cat", ("a", "b")),
    ("linear", "linear", ("a", "c")),
    ("svd", "svd", ("a", "b")),
    ("ties", "ties_svd", ("a", "b")),
    ("magnitude_prune", "magnitude_prune_svd", ("a", "b")),
])
def test_matches_peft_add_weighted_adapter(peft_model, ours_method, peft_method, names):
  ws = [0.8, -0.3]
  new = f"{ours_method}_merged"
  peft_model.add_weighted_adapter(list(names), ws, new, combination_type=peft_method,
                                  density=0.5, svd_rank=3)
  got = mg.merge_adapters([ours(peft_model, n) for n in names], ours_method, ws,
                          density=0.5, rank=3)
  for mod in ("q", "v"):
    np.testing.assert_allclose(delta(got[mod]), peft_delta(peft_model, new, mod), atol=1e-4,
                               err_msg=f"{mod}")
    if ours_method in ("cat", "linear"):   # factor for factor
      layer = getattr(peft_model.base_model.model, mod)
      np.testing.assert_allclose(np.asarray(got[mod].a), layer.lora_A[new].weight.detach().numpy().T,
                                 atol=1e-5)
  if ours_method in ("cat", "svd"):   # exact methods: the weighted sum of the updates
    for mod in ("q", "v"):
      want = sum(w * peft_delta(peft_model, n, mod) for w, n in zip(ws, names))
      tol = 1e-4 if ours_method == "cat" else None
      if tol:
        np.testing.assert_allclose(delta(got[mod]), want, atol=tol)


# ---------------------------------------------------------------------------
# extract_lora

def test_extract_recovers_low_rank_difference_and_reports_error():
  k = jax.random.split(jax.random.key(0), 5)
  base = {"layers": [{"kernel": jax.random.normal(k[0], (12, 10))}],
          "embed": jax.random.normal(k[1], (7, 5)), "bias": jnp.ones(10)}
  low = jax.random.normal(k[2], (12, 3)) @ jax.random.normal(k[3], (3, 10))
  ft = {"layers": [{"kernel": base["layers"][0]["kernel"] + low}],
        "embed": base["embed"] + 1.0, "bias": jnp.zeros(10)}
  params, err = extract_lora(base, ft, rank=3)
  leaf = params["layers"][0]["kernel"]
  assert isinstance(leaf, lj.LoraWeight) and leaf.rank == 3 and leaf.scale == 1.0
  assert leaf.w is base["layers"][0]["kernel"]
  assert set(err) == {"layers/0/kernel"} and err["layers/0/kernel"] < 1e-5
  # embeddings and 1-D leaves stay at full rank, from the finetuned model
  assert params["embed"] is ft["embed"] and params["bias"] is ft["bias"]
  chex.assert_trees_all_close(lj.merge(params), ft, atol=1e-4)
  # a full-rank difference: the error is the Eckart-Young bound
  noise = jax.random.normal(k[4], (12, 10))
  ft2 = {**ft, "layers": [{"kernel": base["layers"][0]["kernel"] + noise}]}
  _, err2 = extract_lora(base, ft2, rank=4)
  s = np.linalg.svd(np.asarray(noise, np.float64), compute_uv=False)
  np.testing.assert_allclose(err2["layers/0/kernel"],
                             np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()), rtol=1e-4)


def test_extract_stacked_targets_dtype_and_errors():
  k = jax.random.split(jax.random.key(1), 2)
  base = {"l": jax.random.normal(k[0], (2, 6, 5), jnp.bfloat16)}
  ft = {"l": base["l"] + jax.random.normal(k[1], (2, 6, 5), jnp.bfloat16)}
  p, err = extract_lora(base, ft, rank=5, targets="l")
  assert p["l"].a.shape == (2, 6, 5) and p["l"].b.shape == (2, 5, 5)
  assert p["l"].a.dtype == jnp.bfloat16 and err["l"] < 1e-5
  with pytest.raises(ValueError, match="rank must be a positive int"):
    extract_lora(base, ft, rank=0)
  with pytest.raises(ValueError, match="target pattern 'x' matches no path"):
    extract_lora(base, ft, rank=2, targets="x")
  with pytest.raises(ValueError, match=r"l: shape \(2, 6, 4\) in finetuned"):
    extract_lora(base, {"l": jnp.zeros((2, 6, 4))}, rank=2)


@pytest.mark.interop
def test_extract_matches_mergekit_decomposition():
  torch = pytest.importorskip("torch")
  pytest.importorskip("mergekit")
  from mergekit.architecture import WeightInfo
  from mergekit.graph import Task
  from mergekit.scripts.extract_lora import TaskVectorDecompositionTask

  class Given(Task):
    def arguments(self):
      return {}

    def execute(self):
      return None

  r = np.random.default_rng(0)
  base_t, ft_t = r.normal(size=(6, 9)).astype(np.float32), r.normal(size=(6, 9)).astype(np.float32)
  task = TaskVectorDecompositionTask(weight_info=WeightInfo(name="x.weight"),
                                     input_task=Given(), max_rank=3)
  lora_a, lora_b = task.execute(task_vector=torch.from_numpy(ft_t - base_t))   # (r, in), (out, r)
  # torch (out, in) weights are (in, out) kernels here
  p, _ = extract_lora({"x": jnp.asarray(base_t.T)}, {"x": jnp.asarray(ft_t.T)}, rank=3,
                      targets="x")
  np.testing.assert_allclose(np.asarray(p["x"].a @ p["x"].b), (lora_b @ lora_a).numpy().T,
                             atol=1e-5)
  # same split of the singular values: column norms of a == row norms of lora_A
  np.testing.assert_allclose(np.linalg.norm(np.asarray(p["x"].a), axis=0),
                             np.linalg.norm(lora_a.numpy(), axis=1), rtol=1e-5)
