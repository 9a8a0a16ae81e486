"""Bad input to every public merge function and to `lora-jax merge`: each case
asserts the error type and that the message names the offending key / path /
parameter / shape / dtype and what was expected. Hostile YAML (alias bombs,
deep nesting, recursive aliases, huge files) is refused with short messages."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import merging as mg
from merging import _yaml, cli
from test_merge_helpers import tiny_ckpt, write_yaml

KEY = jax.random.key(0)


def tr(v=1.0, dtype=jnp.float32, n=2):
  return {"w": jnp.full((2, 3), v, dtype), "layers": [{"k": jnp.full((3,), v, dtype)}
                                                       for _ in range(n)]}


A, B, C = tr(1.0), tr(0.0), tr(2.0)
ALL = sorted(mg.METHODS)


def call(name, models, base=None, **kw):
  """`mg.merge` with the parameters each method needs to run."""
  m = mg.METHODS[name]
  need = {"slerp": dict(t=0.5), "nearswap": dict(t=0.1)}.get(name, {})
  if m.random:
    need["key"] = KEY
  if m.base == "none":
    base = None
  return mg.merge(name, models, base, **{**need, **kw})


def two(name):
  m = mg.METHODS[name]
  return [A, C] if m.max_models is None or m.max_models >= 2 else [A]


# ---------------------------------------------------------------------------
# every method: models, structure, shapes, dtypes, leaves, unknown parameters

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("models", [{"m": 1}, "ab", None, 3], ids=["dict", "str", "None", "int"])
def test_models_must_be_a_list(name, models):
  with pytest.raises(TypeError, match=rf"{name}: models must be a list of pytrees, got"):
    call(name, models, B)


@pytest.mark.parametrize("name", ALL)
def test_empty_and_too_many_models(name):
  m = mg.METHODS[name]
  with pytest.raises(ValueError, match=rf"{name} takes (at least|exactly) {m.min_models} models"):
    call(name, [], B)
  if m.max_models is not None:
    with pytest.raises(ValueError, match=rf"{name} takes exactly {m.max_models} models.*got "
                                         rf"{m.max_models + 1}"):
      call(name, [A] * (m.max_models + 1), B)


@pytest.mark.parametrize("name", ALL)
def test_base_policy(name):
  m = mg.METHODS[name]
  if m.base == "required":
    with pytest.raises(ValueError, match=rf"{name} needs a base model"):
      mg.merge(name, two(name), None, **({"key": KEY} if m.random else {}),
               **({"t": 0.5} if "t" in m.params else {}))
  elif m.base == "none":
    with pytest.raises(ValueError, match=rf"{name} takes no base model"):
      mg.merge(name, two(name), B)


@pytest.mark.parametrize("name", ALL)
def test_mismatched_structure_shape_dtype_and_leaf_type(name):
  models = two(name)
  bad = dict(tr(2.0), w="abc")
  with pytest.raises(TypeError, match=r"w: leaf of models\[0\] is str 'abc'; expected an array"):
    call(name, [bad] + models[1:], B)
  if mg.METHODS[name].base == "none" and mg.METHODS[name].max_models == 1:
    return      # one tree: nothing to compare
  bad = tr(2.0, n=3)
  with pytest.raises(ValueError, match=r"layers/2"):
    call(name, [bad] + models[1:], B)
  bad = tr(2.0)
  bad["layers"][1]["k"] = jnp.ones((4,))
  with pytest.raises(ValueError, match=r"layers/1/k: shape \([34],\) in (models\[[01]\]|base) "
                                       r"does not match \([34],\)"):
    call(name, [bad] + models[1:], B)
  bad = tr(2.0, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"layers/0/k: dtype (bfloat16|float32) in "
                                       r"(models\[[01]\]|base) does not match (float32|bfloat16)"):
    call(name, [bad] + models[1:], B)


@pytest.mark.parametrize("name", ALL)
def test_unknown_parameter_lists_the_methods(name):
  m = mg.METHODS[name]
  with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['densty'\]") as e:
    call(name, two(name), B, densty=0.2)
  for p in m.params.values():
    assert p.yaml in str(e.value)
  if m.params:      # the generated tree function too
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['bogus'\]"):
      m.fn(*([B, A] if m.inputs[0] in ("a", "base") else
             [[A]] if m.inputs[0] == "model" else [two(name)] + ([B] if m.base == "required"
                                                                  else [])),
           bogus=1, **({"t": 0.5} if "t" in m.params else {}),
           **({"key": KEY} if m.random else {}))


def _numeric_params(name):
  m = mg.METHODS[name]
  return [(name, p) for p in m.params.values() if p.kind in (float, int) and not p.choices]


NUMERIC = [x for n in ALL for x in _numeric_params(n)]


@pytest.mark.parametrize("name,p", NUMERIC, ids=[f"{n}-{p.yaml}" for n, p in NUMERIC])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_parameters(name, p, bad):
  value = [bad] * len(two(name)) if p.api == "weights" else bad
  with pytest.raises(ValueError, match=rf"parameter {p.yaml!r} must be a finite number, got"):
    call(name, two(name), B, **{p.api: value})


@pytest.mark.parametrize("name,p", NUMERIC, ids=[f"{n}-{p.yaml}" for n, p in NUMERIC])
@pytest.mark.parametrize("bad", ["0.5", [[1.0], "x"], True, object()],
                         ids=["str", "nested", "bool", "object"])
def test_wrong_parameter_types(name, p, bad):
  value = [bad] * len(two(name)) if p.api == "weights" else bad
  with pytest.raises(TypeError, match=rf"parameter {p.yaml!r} must be a finite number, got"):
    call(name, two(name), B, **{p.api: value})


@pytest.mark.parametrize("name,p", [x for x in NUMERIC if x[1].lo is not None or
                                    x[1].hi is not None],
                         ids=[f"{n}-{p.yaml}" for n, p in NUMERIC
                              if p.lo is not None or p.hi is not None])
def test_out_of_range_parameters(name, p):
  step = 1 if p.kind is int else 0.5
  for v in ([p.lo - step] if p.lo is not None else []) + ([p.hi + step] if p.hi is not None
                                                          else []):
    value = [v] * len(two(name)) if p.per_model and p.api == "weights" else v
    with pytest.raises(ValueError, match=rf"parameter {p.yaml!r} must be .*got {v:g}"):
      call(name, two(name), B, **{p.api: value})
    # the same bound inside a path mapping, named by its pattern, before any work
    m = {"layers/1/.*": v, ".*": p.lo if p.lo is not None else p.hi}
    with pytest.raises(ValueError, match=rf"{p.yaml}\['layers/1/\.\*'\]: parameter "
                                         rf"{p.yaml!r} must be"):
      call(name, two(name), B, **{p.api: [m] * len(two(name)) if p.api == "weights" else m})


@pytest.mark.parametrize("name", [n for n in ALL if mg.METHODS[n].params and any(
    p.kind is bool for p in mg.METHODS[n].params.values())])
def test_bool_parameters_take_bools(name):
  p = next(p for p in mg.METHODS[name].params.values() if p.kind is bool)
  for bad in ("yes", 1, 0.0):
    with pytest.raises(TypeError, match=rf"parameter {p.yaml!r} must be true or false"):
      call(name, two(name), B, **{p.api: bad})


def test_weights_and_per_model_settings():
  with pytest.raises(TypeError, match="weights must be a sequence with one setting per model"):
    mg.linear([A, B], weights=0.5)
  with pytest.raises(ValueError, match="weights: 3 values for 2 models"):
    mg.ties([A, B], C, weights=[1, 1, 1])
  with pytest.raises(ValueError, match="'density': PerModel has 1 values for 2 models"):
    mg.ties([A, B], C, weights=[1, 1], density=mg.PerModel([0.5]))
  with pytest.raises(TypeError, match="PerModel takes a list"):
    mg.ties([A, B], C, weights=[1, 1], density=mg.PerModel(0.5))
  with pytest.raises(ValueError, match="'weight' must be a finite number, got nan"):
    mg.ties([A, B], C, weights=[1, [0.0, 2.0, float("nan")]])   # inside a gradient
  with pytest.raises(TypeError, match="mapping keys must be path regexes"):
    mg.slerp(A, B, t={1: 0.5})
  with pytest.raises(TypeError, match="weight.*given twice"):
    mg.merge("ties", [A], C, weights=[1], weight=mg.PerModel([1]))
  with pytest.raises(ValueError, match="sum to 0"):
    mg.linear([A, B], weights=[1.0, -1.0])


def test_choices_keys_and_names():
  with pytest.raises(ValueError, match=r"'rescale' must be one of \[True, False, 'l1', "
                                       r"'inverse'\], got 'l2'"):
    mg.ties([A], C, [1], rescale="l2")
  with pytest.raises(ValueError, match="rescale='inverse' applies only to random drops"):
    mg.ties([A], C, [1], rescale="inverse")
  with pytest.raises(ValueError, match=r"'consensus' must be one of \[None, 'sum', 'count'\]"):
    mg.ties([A], C, [1], consensus="max")
  with pytest.raises(TypeError, match="key must be one PRNG key.*got str 'seed'"):
    mg.dare_ties([A], C, [1], density=0.5, key="seed")
  with pytest.raises(TypeError, match="key must be one PRNG key"):
    mg.dare_ties([A], C, [1], density=0.5, key=jax.random.split(KEY, 2))
  with pytest.raises(ValueError, match="drops entries at random: pass key="):
    mg.dare_linear([A], C, [1], density=0.5)
  with pytest.raises(TypeError, match="key= is only for random methods"):
    mg.merge("ties", [A], C, key=KEY)
  with pytest.raises(ValueError, match="unknown merge method 3; known methods: arcee_fusion"):
    mg.merge(3, [A])
  with pytest.raises(ValueError, match=r"unknown merge method 'xxx.*more chars>; known"):
    mg.merge("x" * 500, [A])       # reprs of user values are cut short
  with pytest.raises(TypeError, match=r"slerp\(a, b, t.*missing a required argument: 't'"):
    mg.slerp(A, B)
  with pytest.raises(TypeError, match=r"'t' must be a finite number, got ArrayImpl"):
    mg.slerp(A, B, t=jnp.asarray([0.1, 0.2]))
  with pytest.raises(ValueError, match="della: epsilon 0.6 must keep density"):
    mg.della([A], C, [1], density=0.5, epsilon=0.6, key=KEY)


def test_long_values_are_cut_short_in_messages():
  huge = "x" * 100_000
  with pytest.raises(TypeError) as e:
    mg.slerp(A, B, t=huge)
  assert len(str(e.value)) < 300 and "more chars" in str(e.value)


def test_stack_layers_bad_input():
  with pytest.raises(ValueError, match="stack_layers: no slices"):
    mg.stack_layers([])
  with pytest.raises(TypeError, match=r"slices\[0\] must be \(model, \(start, end\)\)"):
    mg.stack_layers([A])
  with pytest.raises(ValueError, match=r"slices\[0\]: layer_range \(1, 5\) outside 0..2"):
    mg.stack_layers([(A, (1, 5))])
  with pytest.raises(ValueError, match=r"slices\[0\]: no 'layers'"):
    mg.stack_layers([({"w": A["w"]}, (0, 1))])


# ---------------------------------------------------------------------------
# the command line: configs

@pytest.fixture(scope="module")
def ck(tmp_path_factory):
  root = tmp_path_factory.mktemp("ck")
  return {f"m{i}": tiny_ckpt(root / f"m{i}", i) for i in range(3)}


def _err(tmp_path, capsys, cfg, *flags):
  path = write_yaml(tmp_path / "bad.yml", cfg)
  out = tmp_path / "out"
  assert cli.main(["merge", path, str(out), "--quiet", *flags]) == 2
  assert not out.exists()
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and len(err) < 3000, err[:500]   # one short line
  return err


def ties(ck, **over):
  return {"merge_method": "ties", "base_model": ck["m0"], **over,
          "models": over.get("models", [{"model": ck["m1"],
                                         "parameters": {"weight": 1.0, "density": 0.5}}])}


@pytest.mark.parametrize("where,mutate,want", [
    ("top", lambda c: c.update(merge_methd="ties"),
     r"config: unknown key\(s\) \['merge_methd'\]; accepted keys: \['arithmetic', 'base_model'"),
    ("model", lambda c: c["models"][0].update(paramters={"weight": 1}),
     r"models\[0\]: unknown key\(s\) \['paramters'\]; accepted keys: \['model', 'parameters'\]"),
    ("params", lambda c: c["models"][0]["parameters"].update(densty=0.2),
     r"models\[0\].parameters: unknown parameter\(s\) \['densty'\].*did you mean 'density'.*"
     r"density: float in \[0, 1\], per model, default 1.0"),
    ("top-params", lambda c: c.update(parameters={"gama": 0.1}),
     r"parameters: unknown parameter\(s\) \['gama'\] for merge method 'ties'"),
    ("condition", lambda c: c.update(parameters={"lambda": [{"filter": "mlp", "value": 1,
                                                             "vaule": 2}]}),
     r"parameters.lambda: conditional parameter entry .* unknown key\(s\) \['vaule'\]"),
    ("models-type", lambda c: c.update(models={"model": "x"}),
     r"models must be a list, got \{'model': 'x'\}"),
    ("model-missing", lambda c: c.update(models=[{"parameters": {}}]),
     r"models\[0\]: missing key\(s\) \['model'\]"),
    ("model-type", lambda c: c.update(models=[{"model": 3}]),
     r"models\[0\].model: a model reference must be a path string, got 3"),
    ("method-type", lambda c: c.update(merge_method=["ties"]),
     r"unknown merge_method \['ties'\]; known methods"),
    ("dtype", lambda c: c.update(dtype="float8"),
     r"dtype: unknown dtype 'float8'; expected one of"),
    ("dtype-type", lambda c: c.update(dtype=16), r"dtype must be a string, got 16"),
    ("arith", lambda c: c.update(arithmetic="torch"),
     r"arithmetic must be one of \['float32', 'mergekit'\], got 'torch'"),
    ("density", lambda c: c["models"][0]["parameters"].update(density=1.5),
     r"tensor .* \(model .*m1\): parameter 'density' must be in \[0, 1\], got 1.5"),
    ("density-neg", lambda c: c["models"][0]["parameters"].update(density=-0.5),
     r"parameter 'density' must be in \[0, 1\], got -0.5"),
    ("huge-int", lambda c: c["models"][0]["parameters"].update(weight=10 ** 400),
     r"parameter 'weight' must be a finite number, got 1000000000"),
    ("nan", lambda c: c["models"][0]["parameters"].update(weight=float("nan")),
     r"parameter 'weight' must be a finite number, got nan"),
    ("string", lambda c: c["models"][0]["parameters"].update(weight="heavy"),
     r"parameter 'weight' must be a number, got 'heavy'"),
    ("bool", lambda c: c.update(parameters={"normalize": "yes"}),
     r"parameter 'normalize' must be true or false, got 'yes'"),
    ("missing-weight", lambda c: c["models"][0]["parameters"].pop("weight"),
     r"missing required parameter 'weight'"),
    ("params-type", lambda c: c.update(parameters=[1, 2]),
     r"parameters: parameters must be a mapping, got \[1, 2\]"),
    ("modules", lambda c: c.update(modules={"a": {}}), r"'modules' configs are not supported"),
    ("both", lambda c: c.update(slices=[{"sources": []}]),
     r"exactly one of 'models' or 'slices'"),
])
def test_bad_configs(ck, tmp_path, capsys, where, mutate, want):
  import re
  cfg = ties(ck)
  mutate(cfg)
  err = _err(tmp_path, capsys, cfg)
  assert re.search(want, err), err


@pytest.mark.parametrize("mutate,want", [
    (lambda s: s[0].update(residual_weight=0.5), r"slices\[0\]: residual_weight is not supported"),
    (lambda s: s[0].update(sourcs=[]), r"slices\[0\]: unknown key\(s\) \['sourcs'\]; accepted "
                                       r"keys: \['base_model', 'parameters', 'sources'\]"),
    (lambda s: s[0]["sources"][0].update(layer_rang=[0, 1]),
     r"slices\[0\].sources\[0\]: unknown key\(s\) \['layer_rang'\]"),
    (lambda s: s[0]["sources"][0].update(layer_range=[0, 9]),
     r"slices\[0\].sources\[0\]: layer_range \[0, 9\] is outside the 2 layers"),
    (lambda s: s[0]["sources"][0].update(layer_range=[True, 1]),
     r"slices\[0\].sources\[0\]: layer_range must be \[start, end\], got \[True, 1\]"),
    (lambda s: s[0]["sources"][0].update(layer_range="0-1"),
     r"layer_range must be \[start, end\], got '0-1'"),
    (lambda s: s[0].update(sources=[]), r"slices\[0\].sources must be a non-empty list"),
    (lambda s: s[0]["sources"][0].update(parameters={"scael": 2}),
     r"slices\[0\].sources\[0\].parameters: unknown parameter\(s\) \['scael'\].*did you mean "
     r"'scale'"),
    (lambda s: s[0].update(parameters={"scale": float("inf")}),
     r"parameter 'scale' must be a finite number, got inf"),
])
def test_bad_slices(ck, tmp_path, capsys, mutate, want):
  import re
  slices = [{"sources": [{"model": ck["m1"], "layer_range": [0, 1]}]},
            {"sources": [{"model": ck["m2"], "layer_range": [1, 2]}]}]
  mutate(slices)
  err = _err(tmp_path, capsys, {"merge_method": "passthrough", "slices": slices})
  assert re.search(want, err), err


def test_model_counts_and_base(ck, tmp_path, capsys):
  m0, m1, m2 = ck["m0"], ck["m1"], ck["m2"]
  err = _err(tmp_path, capsys, {"merge_method": "slerp", "base_model": m0,
                                "parameters": {"t": 0.5},
                                "models": [{"model": m0}, {"model": m1}, {"model": m2}]})
  assert "slerp takes 2 input models (base included), got 3" in err
  err = _err(tmp_path, capsys, {"merge_method": "slerp", "parameters": {"t": 0.5},
                                "models": [{"model": m0}, {"model": m1}]})
  assert "slerp needs a base_model among the inputs" in err
  err = _err(tmp_path, capsys, {"merge_method": "nuslerp", "models": [
      {"model": m1, "parameters": {"weight": 1}}]})
  assert "nuslerp takes exactly 2 models besides the base, got 1" in err
  err = _err(tmp_path, capsys, {"merge_method": "slerp", "base_model": m0,
                                "parameters": {"t": 1.5}, "models": [{"model": m0}, {"model": m1}]})
  assert "parameter 't' must be in [0, 1], got 1.5" in err
  err = _err(tmp_path, capsys, {"merge_method": "model_stock", "base_model": m0,
                                "models": [{"model": m0}, {"model": m1}, {"model": m2}]},
             "--mergekit-arithmetic")
  assert "arithmetic 'mergekit' is not reproduced for 'model_stock'" in err


# ---------------------------------------------------------------------------
# the command line: flags

@pytest.mark.parametrize("flags,want", [
    (["--seed", "-1"], "--seed -1: must be in [0, 9223372036854775807]"),
    (["--random-seed", "x"], "--seed 'x': expected an integer"),
    (["--seed", str(2 ** 64)], "must be in [0,"),
    (["--max-shard-size", "0"], "--max-shard-size '0': must be at least 1 byte"),
    (["--max-shard-size=-5GB"], "--max-shard-size '-5GB': expected a size like 5GB"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots': expected a size like 5GB"),
    (["--out-shard-size", "1.5B"], "--out-shard-size '1.5B': expected an integer with an "
                                   "optional k/M/B suffix"),
    (["--out-shard-size", "-1"], "--out-shard-size '-1'"),
    (["--max-shard-size", "1GB", "--out-shard-size", "1B"], "give one of --max-shard-size and "
                                                            "--out-shard-size"),
    (["--num-threads", "0"], "--num-threads 0: must be >= 1"),
    (["--write-threads", "many"], "--write-threads 'many': expected an integer"),
    (["--no-safe-serialization"], "lora-jax writes only safetensors"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--device"], "expected one argument"),
    (["--lora-merge-dtype", "int3"], "argument --lora-merge-dtype: invalid choice: 'int3'"),
    (["--intermediate-dir"], "expected one argument"),
])
def test_bad_flags(ck, tmp_path, capsys, flags, want):
  path = write_yaml(tmp_path / "c.yml", ties(ck))
  assert cli.main(["merge", path, str(tmp_path / "out"), "--quiet", *flags]) == 2
  err = capsys.readouterr().err
  assert want in err and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()


def test_multi_document_errors(ck, tmp_path, capsys):
  m0, m1 = ck["m0"], ck["m1"]
  doc = yaml.safe_dump({"merge_method": "linear", "models": [
      {"model": m0, "parameters": {"weight": 1}}, {"model": m1, "parameters": {"weight": 1}}]})
  named = lambda n, ref=m1: yaml.safe_dump({"name": n, "merge_method": "linear", "models": [
      {"model": m0, "parameters": {"weight": 1}}, {"model": ref, "parameters": {"weight": 1}}]})
  cases = [
      (named("a") + "---\n" + doc, [], "pass --intermediate-dir DIR"),
      (doc + "---\n" + doc, ["-I", str(tmp_path / "i")], "documents [1, 2] have no name"),
      (named("a") + "---\n" + named("a"), ["-I", str(tmp_path / "i")],
       "document 2: name 'a' is used by an earlier document"),
      (named("a/b") + "---\n" + doc, ["-I", str(tmp_path / "i")],
       "document 1: name 'a/b' must be a non-empty string"),
      (named("a", "b") + "---\n" + named("b", "a") + "---\n" + doc,
       ["-I", str(tmp_path / "i")], "circular references between merges: a -> b -> a"),
      ("- 1\n---\n" + doc, ["-I", str(tmp_path / "i")],
       "document 1: a merge config must be a mapping, got list"),
      (named("a") + "---\n" + yaml.safe_dump({"merge_method": "linear", "models": [
          {"model": "a", "parameters": {"weight": 1}}, {"model": m0, "parameters": {
              "wieght": 1}}]}), ["-I", str(tmp_path / "i")],
       "merge 'final': models[1].parameters: unknown parameter(s) ['wieght']"),
  ]
  for text, flags, want in cases:
    path = write_yaml(tmp_path / "m.yml", text)
    assert cli.main(["merge", path, str(tmp_path / "out"), "--quiet", *flags]) == 2, want
    err = capsys.readouterr().err
    assert want in err, (want, err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# hostile YAML

def _bomb(levels, width=10):
  lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
  for i in range(1, levels):
    lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
  lines.append(f"merge_method: linear\nmodels: *a{levels - 1}")
  return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,want", [
    (_bomb(8), "expands to more than 200000 values"),            # ~565 bytes, 10^8 values
    (_bomb(5), "expands to more than 200000 values"),
    ("a: &a [*a]\nmerge_method: linear\n", "recursive alias"),
    ("merge_method: linear\nmodels: " + "[" * 100 + "]" * 100 + "\n", "nests deeper than 64"),
    ("merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", "nests"),
    ("merge_method: [unclosed\n", "invalid YAML"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("\xff\xfe bad bytes", None),
    ("", "has no YAML document"),
    ("42\n", "the config must be a YAML mapping, got int"),
])
def test_hostile_yaml_is_refused_quickly_and_briefly(tmp_path, capsys, text, want):
  path = tmp_path / "h.yml"
  if want is None:
    path.write_bytes(b"\xff\xfe\x00bad")
    want = "is not UTF-8 text"
  else:
    path.write_text(text)
  assert cli.main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert want in err, err[:500]
  assert len(err) < 1000 and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_yaml_loader_bounds_and_numbers(tmp_path):
  assert len(_bomb(8)) < 700
  with pytest.raises(ValueError, match="expands to more than"):
    _yaml.loads(_bomb(8))
  big = tmp_path / "big.yml"
  big.write_text("x: " + "a" * (_yaml.MAX_BYTES + 10))
  with pytest.raises(ValueError, match="configs are at most"):
    _yaml.load(str(big))
  with pytest.raises(ValueError, match="is a directory"):
    _yaml.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _yaml.load(str(tmp_path / "none.yml"))
  # mergekit's pydantic reads 1e-5 as a number; so do we (YAML 1.1 would give a string)
  assert _yaml.loads("eps: 1e-5\nx: 2E3\ns: 1e5x\n") == [{"eps": 1e-5, "x": 2000.0, "s": "1e5x"}]
  # a moderately aliased config is fine
  doc = _yaml.loads("w: &w 0.5\nmodels: [{p: *w}, {p: *w}]\n")[0]
  assert doc["models"][1]["p"] == 0.5
