"""`lora-jax merge` against mergekit 0.1.5 run at test time on tiny random Llama checkpoints.

The checkpoints (3 layers, hidden 32, saved with transformers) and every mergekit
run are built once per module; our CLI runs on the same YAML and the tensors must
agree within 1e-5. DARE and DELLA drop at random (torch's RNG vs ours), so those
are compared by statistics: kept fraction, L1 rescale, and the mean.
"""

import glob
import json
import os

import numpy as np
import pytest
import yaml

from merging import cli

pytestmark = [pytest.mark.interop, pytest.mark.slow]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("mergekit")

N_LAYERS = 3


def make_llama(path, seed, dtype=None, shard=None, layers=N_LAYERS, hidden=32):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, tie_word_embeddings=False)
  m = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for p in m.parameters():   # norms start at 1 in every model: give them deltas too
      p.add_(torch.randn_like(p) * 0.02)
  if dtype is not None:
    m = m.to(dtype)
  kw = {"max_shard_size": shard} if shard else {}
  m.save_pretrained(path, safe_serialization=True, **kw)
  return str(path)


def load_dir(d):
  from safetensors.numpy import load_file
  out = {}
  for f in glob.glob(os.path.join(d, "*.safetensors")):
    out.update(load_file(f))
  return out


def load_dir_f32(d):
  """Tensors as float32 (bf16 through torch, which numpy cannot read)."""
  from safetensors.torch import load_file
  out = {}
  for f in glob.glob(os.path.join(d, "*.safetensors")):
    out.update({k: v.float().numpy() for k, v in load_file(f).items()})
  return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  paths = {f"m{i}": make_llama(root / f"m{i}", i) for i in range(4)}
  paths["sharded"] = make_llama(root / "sharded", 7, shard="20KB")
  paths["b0"] = make_llama(root / "b0", 10, dtype=torch.bfloat16)
  paths["b1"] = make_llama(root / "b1", 11, dtype=torch.bfloat16)
  return paths


def configs(p):
  m0, m1, m2, m3 = p["m0"], p["m1"], p["m2"], p["m3"]
  return {
      "linear": {
          "merge_method": "linear", "dtype": "float32",
          "models": [
              {"model": m1, "parameters": {"weight": 0.7}},
              {"model": m2, "parameters": {"weight": [0.2, 0.8]}},
              {"model": m3, "parameters": {"weight": [{"filter": "self_attn", "value": 0.3},
                                                      {"value": 0.5}]}}]},
      "linear_sharded": {
          "merge_method": "linear", "dtype": "float32",
          "models": [{"model": p["sharded"], "parameters": {"weight": 1.0}},
                     {"model": m1, "parameters": {"weight": 3.0}}]},
      "linear_bf16": {
          "merge_method": "linear",
          "models": [{"model": p["b0"], "parameters": {"weight": 0.5}},
                     {"model": p["b1"], "parameters": {"weight": 0.5}}]},
      "slerp": {
          "merge_method": "slerp", "base_model": m0, "dtype": "float32",
          "models": [{"model": m0}, {"model": m1}],
          "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                               {"value": 0.5}]}},
      "nuslerp": {
          "merge_method": "nuslerp", "base_model": m0, "dtype": "float32",
          "models": [{"model": m1, "parameters": {"weight": 0.3}},
                     {"model": m2, "parameters": {"weight": 0.7}}]},
      "nuslerp_rows": {
          "merge_method": "nuslerp", "dtype": "float32",
          "parameters": {"nuslerp_flatten": False},
          "models": [{"model": m1, "parameters": {"weight": 0.6}},
                     {"model": m2, "parameters": {"weight": 0.4}}]},
      "task_arithmetic": {
          "merge_method": "task_arithmetic", "base_model": m0, "dtype": "float32",
          "parameters": {"lambda": 0.8},
          "models": [{"model": m1, "parameters": {"weight": 0.5}},
                     {"model": m2, "parameters": {"weight": [0.1, 0.9]}}]},
      "ties": {
          "merge_method": "ties", "base_model": m0, "dtype": "float32",
          "models": [{"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                     {"model": m2, "parameters": {"weight": 0.4, "density": [0.3, 0.9]}},
                     {"model": m3, "parameters": {"weight": 0.3, "density": 0.7}}]},
      "breadcrumbs": {
          "merge_method": "breadcrumbs", "base_model": m0, "dtype": "float32",
          "parameters": {"gamma": 0.05},
          "models": [{"model": m1, "parameters": {"weight": 0.6, "density": 0.6}},
                     {"model": m2, "parameters": {"weight": 0.5, "density": 0.8}}]},
      "breadcrumbs_ties": {
          "merge_method": "breadcrumbs_ties", "base_model": m0, "dtype": "float32",
          "parameters": {"gamma": 0.1, "density": 0.5, "weight": 1.0},
          "models": [{"model": m1}, {"model": m2}]},
      "model_stock": {
          "merge_method": "model_stock", "base_model": m0, "dtype": "float32",
          "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
      "karcher": {
          "merge_method": "karcher", "dtype": "float32",
          "parameters": {"max_iter": 3, "tol": 1e-7},
          "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
      "multislerp": {
          "merge_method": "multislerp", "dtype": "float32",
          "models": [{"model": m1, "parameters": {"weight": 0.5}},
                     {"model": m2, "parameters": {"weight": [0.2, 0.8]}},
                     {"model": m3, "parameters": {"weight": 0.3}}]},
      "multislerp_base": {
          "merge_method": "multislerp", "base_model": m0, "dtype": "float32",
          "parameters": {"normalize_weights": False},
          "models": [{"model": m1, "parameters": {"weight": 0.5}},
                     {"model": m2, "parameters": {"weight": 0.4}}]},
      "nearswap": {
          "merge_method": "nearswap", "base_model": m0, "dtype": "float32",
          "parameters": {"t": [0.001, 0.05]}, "models": [{"model": m0}, {"model": m1}]},
      "sce": {
          "merge_method": "sce", "base_model": m0, "dtype": "float32",
          "parameters": {"select_topk": 0.3},
          "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
      # mergekit's float32 importance cancels on near-identical rows and flips keep/drop
      # decisions; ours is computed stably, so the reference is mergekit's own formula in
      # float64 (its intended math), written as float32
      "arcee_fusion": {
          "merge_method": "arcee_fusion", "base_model": m0, "dtype": "float64",
          "out_dtype": "float32", "models": [{"model": m0}, {"model": m1}]},
      "ram": {
          "merge_method": "ram", "base_model": m0, "dtype": "float32",
          "parameters": {"epsilon": 0.01},
          "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
      "ramplus_tl": {
          "merge_method": "ramplus_tl", "base_model": m0, "dtype": "float32",
          "parameters": {"epsilon": 0.01, "r": 0.3, "alpha": 0.5},
          "models": [{"model": m1}, {"model": m2}, {"model": m3}]},
      "passthrough": {
          "merge_method": "passthrough", "dtype": "float32",
          "slices": [{"sources": [{"model": m1, "layer_range": [0, 2]}]},
                     {"sources": [{"model": m2, "layer_range": [1, 3]}]},
                     {"sources": [{"model": m3, "layer_range": [2, 3]}]}]},
      "slerp_slices": {
          "merge_method": "slerp", "base_model": m0, "dtype": "float32",
          "parameters": {"t": [0.0, 1.0]},
          "slices": [{"sources": [{"model": m0, "layer_range": [0, 2]},
                                  {"model": m1, "layer_range": [1, 3]}]},
                     {"sources": [{"model": m0, "layer_range": [2, 3]},
                                  {"model": m1, "layer_range": [0, 1]}]}]},
  }


STAT_CONFIGS = ("dare_linear", "dare_ties", "della")


def stat_configs(p):
  m0, m1, m2 = p["m0"], p["m1"], p["m2"]
  return {
      "dare_linear": {"merge_method": "dare_linear", "base_model": m0, "dtype": "float32",
                      "models": [{"model": m1, "parameters": {"weight": 1.0, "density": 0.3}}]},
      "dare_ties": {"merge_method": "dare_ties", "base_model": m0, "dtype": "float32",
                    "models": [{"model": m1, "parameters": {"weight": 0.5, "density": 0.4}},
                               {"model": m2, "parameters": {"weight": 0.5, "density": 0.4}}]},
      "della": {"merge_method": "della", "base_model": m0, "dtype": "float32",
                "parameters": {"epsilon": 0.1},
                "models": [{"model": m1, "parameters": {"weight": 1.0, "density": 0.4}}]},
  }


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
  """Every config merged by mergekit (python API) and by our CLI."""
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  root = tmp_path_factory.mktemp("runs")
  out = {}
  all_cfgs = {**configs(ckpts), **stat_configs(ckpts)}
  for name, cfg in all_cfgs.items():
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    mk, ours = str(root / f"mk_{name}"), str(root / f"ours_{name}")
    run_merge(MergeConfiguration.model_validate(cfg), mk,
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False,
                           random_seed=0))
    shard = ["--max-shard-size", "30KB"] if name == "linear_sharded" else []
    assert cli.main(["merge", str(path), ours, "--quiet", *shard]) == 0
    out[name] = (mk, ours)
  return out


@pytest.mark.parametrize("name", ["linear", "linear_sharded", "slerp", "nuslerp", "nuslerp_rows",
                                  "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                                  "model_stock", "passthrough", "slerp_slices", "karcher",
                                  "multislerp", "multislerp_base", "nearswap", "sce",
                                  "arcee_fusion", "ram", "ramplus_tl"])
def test_cli_equals_mergekit(runs, name):
  mk, ours = runs[name]
  a, b = load_dir(mk), load_dir(ours)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-5, err_msg=k)
  # the merge actually changed something relative to each input (not a copy)
  cfg_ours = json.load(open(os.path.join(ours, "config.json")))
  cfg_mk = json.load(open(os.path.join(mk, "config.json")))
  assert cfg_ours["num_hidden_layers"] == cfg_mk["num_hidden_layers"]


def test_cli_bf16_equals_mergekit(runs):
  mk, ours = runs["linear_bf16"]
  a, b = load_dir_f32(mk), load_dir_f32(ours)
  assert sorted(a) == sorted(b)
  for k in a:   # both average in float32 and round once to bf16
    np.testing.assert_allclose(b[k], a[k], atol=0, rtol=2 ** -7, err_msg=k)
  from lora_jax import checkpoint as _st
  hdr = _st.read_header(os.path.join(ours, "model.safetensors"))
  assert {i.dtype for i in hdr.values()} == {"BF16"}


def test_cli_sharded_output_has_index(runs):
  _, ours = runs["linear_sharded"]
  idx = json.load(open(os.path.join(ours, "model.safetensors.index.json")))
  files = set(idx["weight_map"].values())
  assert len(files) > 1
  assert all(os.path.exists(os.path.join(ours, f)) for f in files)
  total = sum(v.nbytes for v in load_dir(ours).values())
  assert idx["metadata"]["total_size"] == total


def test_passthrough_stacks_layers(runs, ckpts):
  _, ours = runs["passthrough"]
  out = load_dir(ours)
  m1, m2, m3 = (load_dir(ckpts[k]) for k in ("m1", "m2", "m3"))
  q = "model.layers.{}.self_attn.q_proj.weight"
  np.testing.assert_array_equal(out[q.format(0)], m1[q.format(0)])
  np.testing.assert_array_equal(out[q.format(2)], m2[q.format(1)])
  np.testing.assert_array_equal(out[q.format(4)], m3[q.format(2)])
  np.testing.assert_array_equal(out["model.embed_tokens.weight"], m1["model.embed_tokens.weight"])
  np.testing.assert_array_equal(out["lm_head.weight"], m3["lm_head.weight"])
  assert json.load(open(os.path.join(ours, "config.json")))["num_hidden_layers"] == 5


def _deltas(run_dir, base, model):
  out = load_dir(run_dir)
  return {k: (out[k] - base[k], model[k] - base[k]) for k in out if out[k].ndim == 2}


@pytest.mark.parametrize("side", [0, 1])
def test_dare_linear_statistics(runs, ckpts, side):
  """Both mergekit (side 0) and ours (side 1): kept fraction ~ density, L1 rescale."""
  base, m1 = load_dir(ckpts["m0"]), load_dir(ckpts["m1"])
  kept, n = 0, 0
  for k, (d, full) in _deltas(runs["dare_linear"][side], base, m1).items():
    nz = np.abs(d) > 0
    kept += nz.sum()
    n += d.size
    # l1 rescale (mergekit 0.1.5): the dropped delta keeps the L1 norm of the full one
    np.testing.assert_allclose(np.abs(d).sum(), np.abs(full).sum(), rtol=1e-4, err_msg=k)
    # kept entries are the original entries times one common factor
    ratio = d[nz] / full[nz]
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4, err_msg=k)
  assert abs(kept / n - 0.3) < 0.02


def test_dare_ties_and_della_statistics_match_mergekit(runs, ckpts):
  base = load_dir(ckpts["m0"])
  for name, density in (("dare_ties", None), ("della", 0.4)):
    mk, ours = (load_dir(d) for d in runs[name])
    fr_mk = np.mean([np.mean(mk[k] != base[k]) for k in mk if mk[k].ndim == 2])
    fr_ours = np.mean([np.mean(ours[k] != base[k]) for k in ours if ours[k].ndim == 2])
    assert abs(fr_mk - fr_ours) < 0.03, (name, fr_mk, fr_ours)
    if density is not None:
      assert abs(fr_ours - density) < 0.03
    l1_mk = sum(np.abs(mk[k] - base[k]).sum() for k in mk)
    l1_ours = sum(np.abs(ours[k] - base[k]).sum() for k in ours)
    np.testing.assert_allclose(l1_ours, l1_mk, rtol=0.05)


def test_dry_run_lists_plan_and_writes_nothing(ckpts, tmp_path, capsys):
  cfg = configs(ckpts)["ties"]
  path = tmp_path / "c.yml"
  path.write_text(yaml.safe_dump(cfg))
  out = tmp_path / "out"
  assert cli.main(["merge", str(path), str(out), "--dry-run"]) == 0
  text = capsys.readouterr().out
  assert "merge_method: ties" in text
  assert "model.layers.2.mlp.down_proj.weight" in text
  assert not out.exists()


def _err(tmp_path, capsys, cfg, out=None):
  path = tmp_path / "bad.yml"
  path.write_text(yaml.safe_dump(cfg))
  out = out or tmp_path / "out"
  assert cli.main(["merge", str(path), str(out), "--quiet"]) == 2
  assert not os.path.exists(out) or out == tmp_path
  return capsys.readouterr().err


def test_bad_inputs_fail_before_work(ckpts, tmp_path, capsys):
  m0, m1 = ckpts["m0"], ckpts["m1"]
  base = {"merge_method": "ties", "base_model": m0, "dtype": "float32",
          "models": [{"model": m1, "parameters": {"weight": 1.0, "density": 0.5}}]}
  # unknown method: lists the known ones
  err = _err(tmp_path, capsys, {**base, "merge_method": "tiez"})
  assert "unknown merge_method 'tiez'" in err and "dare_ties" in err and "slerp" in err
  # missing model directory
  err = _err(tmp_path, capsys, {**base, "base_model": str(tmp_path / "nope")})
  assert "nope" in err and "no such directory" in err
  # bad parameter values
  err = _err(tmp_path, capsys, {**base, "models": [
      {"model": m1, "parameters": {"weight": 1.0, "density": 1.5}}]})
  assert "density" in err and "1.5" in err and "[0, 1]" in err
  err = _err(tmp_path, capsys, {**base, "parameters": {"normalize": "yes"}})
  assert "normalize" in err and "true or false" in err
  err = _err(tmp_path, capsys, {**base, "models": [{"model": m1}]})
  assert "missing required parameter 'weight'" in err
  err = _err(tmp_path, capsys, {"merge_method": "della", "base_model": m0, "models": [
      {"model": m1, "parameters": {"weight": 1, "density": 0.5, "epsilon": 0.6}}]})
  assert "epsilon" in err
  # wrong input count
  err = _err(tmp_path, capsys, {"merge_method": "slerp", "base_model": m0,
                                "parameters": {"t": 0.5},
                                "models": [{"model": m0}, {"model": m1}, {"model": ckpts["m2"]}]})
  assert "slerp takes 2 input models" in err
  # a model directory without weights, and an index naming a missing shard
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  err = _err(tmp_path, capsys, {**base, "models": [
      {"model": str(empty), "parameters": {"weight": 1.0}}]})
  assert "no model.safetensors" in err and "empty" in err
  (empty / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
  err = _err(tmp_path, capsys, {**base, "models": [
      {"model": str(empty), "parameters": {"weight": 1.0}}]})
  assert "model-00001-of-00002.safetensors" in err and "missing" in err
  # missing config file
  assert cli.main(["merge", str(tmp_path / "none.yml"), str(tmp_path / "o")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_missing_tensor_and_shape_mismatch_name_tensor_and_models(ckpts, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  m0, m1 = ckpts["m0"], ckpts["m1"]
  # a copy of m1 without one tensor, and one with a wrong shape
  t = load_file(os.path.join(m1, "model.safetensors"))
  cfg_json = open(os.path.join(m1, "config.json")).read()
  for name, mutate in (("dropped", lambda d: d.pop("model.layers.1.mlp.up_proj.weight")),
                       ("reshaped", lambda d: d.__setitem__(
                           "model.norm.weight", np.zeros(7, np.float32)))):
    d = dict(t)
    mutate(d)
    os.makedirs(tmp_path / name)
    save_file(d, str(tmp_path / name / "model.safetensors"))
    (tmp_path / name / "config.json").write_text(cfg_json)
  cfg = {"merge_method": "task_arithmetic", "base_model": m0,
         "models": [{"model": str(tmp_path / "dropped"), "parameters": {"weight": 1.0}}]}
  err = _err(tmp_path, capsys, cfg, tmp_path / "o1")
  assert "model.layers.1.mlp.up_proj.weight is missing in model" in err and "dropped" in err
  cfg["models"][0]["model"] = str(tmp_path / "reshaped")
  err = _err(tmp_path, capsys, cfg, tmp_path / "o2")
  assert "model.norm.weight" in err and "shapes differ" in err and "[7]" in err and "[32]" in err


def test_existing_output_needs_overwrite(ckpts, tmp_path, capsys):
  cfg = configs(ckpts)["model_stock"]
  path = tmp_path / "c.yml"
  path.write_text(yaml.safe_dump(cfg))
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  assert cli.main(["merge", str(path), str(out), "--quiet"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert (out / "keep.txt").exists()
  assert cli.main(["merge", str(path), str(out), "--quiet", "--overwrite"]) == 0
  assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".lora-jax")]


def test_tokenizer_source_warns(ckpts, tmp_path):
  cfg = {**configs(ckpts)["model_stock"], "tokenizer_source": "base"}
  path = tmp_path / "c.yml"
  path.write_text(yaml.safe_dump(cfg))
  with pytest.warns(UserWarning, match="tokenizer_source"):
    cli.run(str(path), str(tmp_path / "o"), dry_run=True)


def test_every_mergekit_method_is_ours():
  from mergekit.merge_methods.registry import registered_methods

  import merging as mg
  theirs = {m.spec.name for m in registered_methods()}
  assert theirs <= set(mg.METHODS), sorted(theirs - set(mg.METHODS))


@pytest.mark.parametrize("kind", ["lora", "dora", "modules_to_save"])
def test_model_plus_lora_reference_equals_mergekit(ckpts, tmp_path, kind):
  """mergekit's `model: base+adapter` reference: the adapter (LoRA, DoRA, or with a fully
  saved lm_head) is applied to the base tensor by tensor while merging."""
  import peft
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  m0, m1 = ckpts["m0"], ckpts["m1"]
  extra = {"dora": {"use_dora": True}, "modules_to_save": {"modules_to_save": ["lm_head"]},
           "lora": {}}[kind]
  pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(m1), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
      init_lora_weights=False, **extra))
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "modules_to_save" in n:
        p.add_(0.05 * torch.randn_like(p))
  pm.save_pretrained(str(tmp_path / "adapter"))
  cfg = {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": m0, "parameters": {"weight": 0.3}},
                    {"model": f"{m1}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.7}}]}
  path = tmp_path / "cfg.yml"
  path.write_text(yaml.safe_dump(cfg))
  run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
            MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False,
                         lora_merge_cache=str(tmp_path / "cache")))
  assert cli.main(["merge", str(path), str(tmp_path / "ours"), "--quiet"]) == 0
  a, b = load_dir(tmp_path / "mk"), load_dir(tmp_path / "ours")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
  # and the adapter really changed the merge
  plain = load_dir_f32(ckpts["m1"])
  k = "model.layers.0.self_attn.q_proj.weight"
  assert not np.allclose(b[k], 0.3 * load_dir(m0)[k] + 0.7 * plain[k], atol=1e-6)


def test_model_plus_lora_errors(ckpts, tmp_path, capsys):
  cfg = {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": ckpts["m0"], "parameters": {"weight": 0.5}},
                    {"model": ckpts["m1"] + "+" + str(tmp_path / "missing"),
                     "parameters": {"weight": 0.5}}]}
  path = tmp_path / "cfg.yml"
  path.write_text(yaml.safe_dump(cfg))
  assert cli.main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
  assert "adapter" in capsys.readouterr().err and not (tmp_path / "out").exists()
