"""Every ```python block of README.md runs as written, or names the example that runs it.

Each block is marked in the README itself, in one of two ways:

- **runnable**: the line just before the fence is an HTML comment
  `<!-- readme-test: NAME -->` (indented like the fence, for blocks inside lists).
  `NAME` picks a case below (`@case("NAME")`): a generator that builds the block's
  *inputs* (tiny arrays, configs, models and the checkpoint directories the block
  names, written into a fresh temporary directory), yields them, receives the block's
  namespace and what it printed, and asserts something about what the block produced.
  The block is `exec`-ed with that directory as the cwd, in a namespace holding only
  those inputs: no modules, so the block's own imports must be complete; every input
  and directory must be one the block names. It runs with jax's default ("standard")
  dtype promotion, as a user's session does (conftest.py makes the rest of the suite
  strict).
- **names an example**: the block's first line is the comment
  `# the whole program: examples/NAME.py`. The example must exist, be exercised by
  tests/test_examples.py (`import NAME` there), and contain every dotted call the block
  makes on the library's modules (`lj.f(`, `qz.f(`, `mg.f(`, `llama.f(`,
  `checkpoint.f(`), so the README cannot show a call the example does not make.

A block with neither marking fails `test_every_block_is_marked`, naming its README line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz
from lora_jax import checkpoint
from lora_jax.models import llama
from train_testing import make_base

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN_MARK = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*-->")
EXAMPLE_MARK = re.compile(r"#\s*the whole program:\s*(examples/(\w+)\.py)\s*$")
FENCE = re.compile(r"^(\s*)```python\s*$")
CALL = re.compile(r"\b(lj|qz|mg|llama|checkpoint)\.(\w+)\s*\(")


@dataclasses.dataclass(frozen=True)
class Block:
  line: int             # 1-based README line of the opening fence
  code: str             # dedented by the fence's indentation
  run: str | None       # NAME of `<!-- readme-test: NAME -->`
  example: str | None   # "examples/NAME.py" of `# the whole program: ...`


def parse_blocks(text: str) -> list[Block]:
  """Every ```python block of a markdown text, indented ones (in lists) included."""
  lines = text.splitlines()
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, start = m.group(1), i
    body = []
    i += 1
    while i < len(lines) and lines[i].strip() != "```":
      body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
      i += 1
    if i == len(lines):
      raise ValueError(f"README.md:{start + 1}: ```python block is never closed")
    prev = RUN_MARK.fullmatch(lines[start - 1].strip()) if start else None
    first = next((b for b in body if b.strip()), "")
    ex = EXAMPLE_MARK.match(first.strip())
    out.append(Block(start + 1, "\n".join(body) + "\n", prev and prev.group(1),
                     ex and ex.group(1)))
    i += 1
  return out


def unmarked(blocks: list[Block]) -> list[str]:
  return [f"README.md:{b.line}: ```python block has neither `<!-- readme-test: NAME -->` "
          "on the line before it nor `# the whole program: examples/NAME.py` as its first "
          "line" for b in blocks if not b.run and not b.example]


def example_problems(block: Block, root: pathlib.Path = ROOT) -> list[str]:
  """What is wrong with a block that names an example (empty: nothing)."""
  where = f"README.md:{block.line}"
  path = root / block.example
  if not path.is_file():
    return [f"{where}: {block.example} does not exist"]
  module = path.stem
  problems = []
  tests = (root / "tests" / "test_examples.py").read_text()
  if not re.search(rf"^\s*import {module}\b", tests, re.M):
    problems.append(f"{where}: {block.example} is not exercised by tests/test_examples.py "
                    f"(no `import {module}` there)")
  source = path.read_text()
  for prefix, name in sorted(set(CALL.findall(block.code))):
    if not re.search(rf"\b{prefix}\.{name}\b", source):
      problems.append(f"{where}: the block calls {prefix}.{name}, {block.example} does not")
  return problems


BLOCKS = parse_blocks(README.read_text())
CASES: dict = {}


def case(name):
  def register(fn):
    CASES[name] = fn
    return fn
  return register


# ----------------------------------------------------------------------------------
# the parser and the checks themselves

def test_parser_finds_every_block_and_its_marking():
  text = ("x\n<!-- readme-test: a-b -->\n```python\nimport os\n```\n"
          "- item\n\n  <!-- readme-test: inner -->\n  ```python\n  y = 1\n    z = 2\n  ```\n"
          "```python\n# the whole program: examples/qlora.py\nqz.quantize(p)\n```\n"
          "<!-- readme-test: x -->\n\n```python\npass\n```\n```bash\nls\n```\n")
  blocks = parse_blocks(text)
  assert [(b.line, b.run, b.example) for b in blocks] == [
      (3, "a-b", None), (9, "inner", None), (13, None, "examples/qlora.py"), (19, None, None)]
  assert blocks[1].code == "y = 1\n  z = 2\n"
  assert unmarked(blocks) == [unmarked([blocks[3]])[0]] and "README.md:19:" in unmarked(blocks)[0]
  with pytest.raises(ValueError, match="README.md:1: .* never closed"):
    parse_blocks("```python\nx = 1\n")


def test_example_check_catches_drift():
  ok = Block(1, "# the whole program: examples/qlora.py\nq = qz.quantize(p, qz.QuantConfig())\n"
             "y = lj.implicit(llama.forward)(q, c, i)\n", None, "examples/qlora.py")
  assert example_problems(ok) == []
  drift = dataclasses.replace(ok, line=7, code=ok.code + "qz.gptq(p, f, b, c)\n")
  assert example_problems(drift) == [
      "README.md:7: the block calls qz.gptq, examples/qlora.py does not"]
  gone = dataclasses.replace(ok, example="examples/nope.py")
  assert example_problems(gone) == ["README.md:1: examples/nope.py does not exist"]
  untested = dataclasses.replace(ok, example="examples/story_data.py", code="x = 1\n")
  assert "not exercised by tests/test_examples.py" in example_problems(untested)[0]


def test_every_block_is_marked():
  assert len(BLOCKS) >= 12
  assert unmarked(BLOCKS) == []
  unknown = [f"README.md:{b.line}: readme-test {b.run!r} has no case in tests/test_readme.py"
             for b in BLOCKS if b.run and b.run not in CASES]
  assert unknown == []
  names = [b.run for b in BLOCKS if b.run]
  assert len(names) == len(set(names)), names


def test_blocks_that_name_an_example_match_it():
  # none does today: every block's inputs are cheap enough to run it
  assert [p for b in BLOCKS if b.example and not b.run for p in example_problems(b)] == []


# ----------------------------------------------------------------------------------
# running a block

def run_block(block: Block, world, cwd: pathlib.Path) -> None:
  gen = CASES[block.run](world, cwd)
  inputs = next(gen)
  modules = [k for k, v in inputs.items() if isinstance(v, types.ModuleType)]
  assert not modules, f"inputs must not hold modules (the block imports them): {modules}"
  unused = [k for k in inputs if not re.search(rf"\b{k}\b", block.code)]
  assert not unused, f"README.md:{block.line}: inputs the block never uses: {unused}"
  unnamed = [p.name for p in cwd.iterdir() if f"{p.name}/" not in block.code]
  assert not unnamed, f"README.md:{block.line}: directories the block never names: {unnamed}"
  ns = dict(inputs)
  out = io.StringIO()
  old = os.getcwd()
  os.chdir(cwd)
  try:
    with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(out):
      exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)  # noqa: S102
    with jax.numpy_dtype_promotion("standard"):
      gen.send((ns, out.getvalue()))
  except StopIteration:
    pass
  else:
    raise AssertionError(f"case {block.run!r} must yield once")
  finally:
    os.chdir(old)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.run], ids=lambda b: b.run)
def test_block_runs(block, world, tmp_path):
  run_block(block, world, tmp_path)


# ----------------------------------------------------------------------------------
# shared tiny inputs

@dataclasses.dataclass
class World:
  root: pathlib.Path          # my-llama/ (a tiny HF Llama with its tokenizer) lives here
  config: llama.LlamaConfig
  params: dict                # its parameters, layers unrolled

  def copy(self, name: str, cwd: pathlib.Path, as_: str | None = None) -> pathlib.Path:
    dst = cwd / (as_ or name)
    shutil.copytree(self.root / name, dst)
    return dst

  def ids(self, seed: int, shape=(2, 8)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, self.config.vocab_size)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("readme")
  make_base(root / "my-llama", hidden=128, layers=1)   # 128 wide: int4 groups of 128 fit
  config, params = llama.load_hf(root / "my-llama")
  return World(root, config, params)


def random_b(params, seed: int, std: float = 0.05):
  """LoRA factors with b != 0 (a fresh adapter is the base), for adapters that matter."""
  key = jax.random.key(seed)

  def fill(x):
    nonlocal key
    if isinstance(x, lj.LoraWeight):
      key, k = jax.random.split(key)
      return dataclasses.replace(x, b=std * jax.random.normal(k, x.b.shape, x.b.dtype))
    return x
  return jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def leaves_of(tree, kind):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


def kernel_bits(summary: str) -> float:
  """The bits per parameter of the quantized leaves in a `qz.summary` table."""
  return float(re.search(r"quantized params: [\d,]+ at ([\d.]+) bits/param", summary).group(1))


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------
# one case per runnable block, in README order

@case("lora-in-20-lines")
def _lora_in_20_lines(world, cwd):
  import flax.linen as nn

  class Attention(nn.Module):     # a Flax model with q/k/v/o projections
    @nn.compact
    def __call__(self, x):
      q, k, v = (nn.Dense(16, use_bias=False, name=f"{n}_proj")(x) for n in "qkv")
      s = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 4.0, axis=-1)
      return x + nn.Dense(16, use_bias=False, name="o_proj")(s @ v)

  model = Attention()
  x = jax.random.normal(jax.random.key(1), (3, 4, 6, 16))
  base_params = model.init(jax.random.key(2), x[0])
  loss_fn = lambda y, batch: jnp.mean((y - 2.0 * batch) ** 2)  # noqa: E731
  ns, out = yield {"key": jax.random.key(0), "base_params": base_params, "model": model,
                   "loss_fn": loss_fn, "batches": list(x)}

  assert "trainable params:" in out
  adapter, frozen, plain = ns["adapter"], ns["frozen"], ns["plain"]
  assert np.isfinite(float(ns["loss"]))
  trained = lj.combine(adapter, frozen)
  for n in "qkvo":
    lw = trained["params"][f"{n}_proj"]["kernel"]
    assert isinstance(lw, lj.LoraWeight) and float(jnp.abs(lw.b).max()) > 0, n  # it trained
    close(plain["params"][f"{n}_proj"]["kernel"], lw.w + lw.scale * lw.a @ lw.b)
  assert not leaves_of(plain, lj.LoraWeight)
  close(model.apply(plain, x[0]), lj.implicit(model.apply)(trained, x[0]))
  # the optimizer state is for the factors only
  assert {np.shape(s) for s in jax.tree.leaves(ns["opt_state"])} <= (
      {np.shape(a) for a in jax.tree.leaves(adapter)} | {()})


@case("leaf-kind")
def _leaf_kind(world, cwd):
  ns, _ = yield {}
  kind = ns["ColumnScaled"]
  w = jax.random.normal(jax.random.key(0), (6, 5))
  leaf = kind(w=w, s=jnp.arange(1.0, 6.0))
  x = jax.random.normal(jax.random.key(1), (3, 6))
  close(lj.implicit(lambda p, v: v @ p["w"])({"w": leaf}, x), (x @ w) * jnp.arange(1.0, 6.0)[None, :])
  adapter, frozen = lj.split({"w": leaf})
  assert adapter["w"].s is leaf.s and frozen["w"].w is leaf.w
  with pytest.raises(ValueError, match="does not fit"):
    kind(w=w, s=jnp.ones((4,)))


@case("llama-hf-peft")
def _llama_hf_peft(world, cwd):
  world.copy("my-llama", cwd)
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"])
  peft = random_b(lj.init(jax.random.key(5), world.params, cfg), 6)
  lj.save_adapter(cwd / "peft-adapter", peft, cfg)    # the same files PEFT writes
  input_ids = world.ids(1)
  prompt_ids = world.ids(2, (2, 5))
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  ns, _ = yield {"key": jax.random.key(0), "input_ids": input_ids, "prompt_ids": prompt_ids,
                 "mask": mask}

  config = ns["config"]
  assert config == world.config
  # logits of the PEFT adapter, computed factored, equal the merged model's
  assert ns["logits"].shape == (2, 8, config.vocab_size)
  close(ns["logits"], llama.forward(lj.merge(peft), config, input_ids), 1e-4)
  tokens = ns["tokens"]
  assert tokens.shape == (2, 32) and tokens.dtype == jnp.int32
  assert int(tokens.min()) >= 0 and int(tokens.max()) < config.vocab_size
  # the DoRA adapter written and the merged model both load back
  params = ns["params"]
  doras = leaves_of(params, lj.DoraWeight)
  assert len(doras) == 2 * config.num_hidden_layers
  back = lj.load_adapter(cwd / "out-adapter", world.params)
  for got, want in zip(leaves_of(back, lj.DoraWeight), doras):
    close(got.a, want.a)
    close(got.m, want.m)
  adapter_config = json.loads((cwd / "out-adapter" / "adapter_config.json").read_text())
  assert adapter_config["use_dora"] and adapter_config["r"] == 16
  _, merged = llama.load_hf(cwd / "merged")
  close(llama.forward(merged, config, input_ids),
        lj.implicit(llama.forward)(params, config, input_ids), 1e-4)


def mlp_params(seed: int, d: int, layers: int) -> dict:
  """A stack of `layers` square MLPs: every kernel `(d, d)` (one shape: one compile)."""
  keys = iter(jax.random.split(jax.random.key(seed), 2 * layers))
  kernel = lambda: {"kernel": jax.random.normal(next(keys), (d, d)) / np.sqrt(d)}  # noqa: E731
  return {"layers": [{"self_attn": {"q_proj": kernel()}, "mlp": {"up_proj": kernel()}}
                     for _ in range(layers)]}


def mlp_apply(params, x):
  for layer in params["layers"]:
    x = x + jnp.tanh(x @ layer["self_attn"]["q_proj"]["kernel"])
    x = x + jnp.tanh(x @ layer["mlp"]["up_proj"]["kernel"])
  return x


@case("qalora")
def _qalora(world, cwd):
  params = mlp_params(0, 256, 2)          # rank 8 needs 8 pooled inputs: in >= 8 * 32
  ns, _ = yield {"params": params, "key": jax.random.key(0)}
  qparams, params, folded = ns["qparams"], ns["params"], ns["folded"]
  lws = leaves_of(params, lj.QALoraWeight)
  assert len(lws) == 4 and lws[0].a.shape == (256 // 32, 8)
  groups = leaves_of(folded, qz.GroupQuantizedArray)
  assert len(groups) == 4 and not leaves_of(folded, lj.QALoraWeight)
  for got, want in zip(groups, leaves_of(qparams, qz.GroupQuantizedArray)):
    assert got.bits == 4 and got.group_size == 32
    np.testing.assert_array_equal(got.packed, want.packed)     # same codes
  x = jax.random.normal(jax.random.key(3), (2, 256))
  close(lj.implicit(mlp_apply)(folded, x), lj.implicit(mlp_apply)(params, x), 1e-4)
  # the fold moves the zero points by the adapter's update, whatever it is
  trained = random_b(params, 1, 0.5)
  close(lj.implicit(mlp_apply)(qz.fold_qalora(trained), x),
        lj.implicit(mlp_apply)(trained, x), 1e-4)


@case("checkpoint-files")
def _checkpoint_files(world, cwd):
  world.copy("my-llama", cwd)
  ns, _ = yield {}
  assert "model.layers.0.mlp.down_proj.weight" in ns["infos"]
  back = checkpoint.read_safetensors(cwd / "out" / "model.safetensors")
  assert list(back) == ["w"]
  close(back["w"], world.params["embed_tokens"]["embedding"], 0)
  assert not [p for p in cwd.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]


def bnb_checkpoint(world, path: pathlib.Path) -> None:
  """A bitsandbytes 4-bit checkpoint (NF4, double quant, block 64) as transformers'
  `load_in_4bit` + `save_pretrained` writes it, from our own quantizer's bytes."""
  shutil.copytree(world.root / "my-llama", path)
  sd = checkpoint.read_safetensors(path / "model.safetensors")
  quantized = {}
  for i, layer in enumerate(world.params["layers"]):
    for group, projs in (("self_attn", llama.ATTN_PROJ), ("mlp", llama.MLP_PROJ)):
      for proj in projs:
        name = f"model.layers.{i}.{group}.{proj}.weight"
        del sd[name]
        quantized[name] = qz.quantize_array(layer[group][proj]["kernel"], "nf4", 64, True)
  sd.update(qz.to_bnb_state_dict(quantized))
  checkpoint.write_safetensors(path / "model.safetensors", sd)
  hf = json.loads((path / "config.json").read_text())
  hf["quantization_config"] = {
      "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}
  (path / "config.json").write_text(json.dumps(hf))


@case("qlora")
def _qlora(world, cwd):
  bnb_checkpoint(world, cwd / "llama-bnb-4bit")
  cfg = lj.LoraConfig(rank=4, alpha=8, targets="all-linear")
  adapter_params = random_b(lj.init(jax.random.key(7), world.params, cfg), 8)
  lj.save_adapter(cwd / "qlora-adapter", adapter_params, cfg)
  ids = world.ids(4)

  def xent(logits, ids):
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))

  x = jax.random.normal(jax.random.key(9), (3, world.config.hidden_size))
  ns, out = yield {"params": world.params, "key": jax.random.key(0), "config": world.config,
                   "ids": ids, "xent": xent, "x": x}

  # the bits per parameter the comment promises (4.127 for large kernels; these are tiny)
  assert 4.127 <= kernel_bits(out) < 4.14, out
  qarray = ns["qarray"]
  assert isinstance(qarray, qz.QuantizedArray) and qarray.format == "nf4" and qarray.double_quant
  close(ns["w"], world.params["layers"][0]["mlp"]["up_proj"]["kernel"], 0.02)
  close(ns["y"], x @ ns["w"], 1e-4)
  # the loss differentiates with respect to the factors only
  loss, grads = jax.value_and_grad(ns["loss"])(ns["adapter"])
  assert np.isfinite(float(loss))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["layers"][0]["mlp"]["up_proj"]["kernel"].b).max()) > 0
  # the bnb checkpoint loads as QuantizedArray kernels, with our quantizer's codes
  qbase, params = ns["qbase"], ns["params"]
  kernels = leaves_of(qbase, qz.QuantizedArray)
  assert len(kernels) == 7 * world.config.num_hidden_layers
  np.testing.assert_array_equal(
      ns["q"].codes, qz.quantize_array(world.params["layers"][0]["mlp"]["up_proj"]["kernel"],
                                       "nf4", 64, True).codes)
  lw = params["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert isinstance(lw, lj.LoraWeight) and isinstance(lw.w, qz.QuantizedArray)
  close(lw.b, adapter_params["layers"][0]["mlp"]["up_proj"]["kernel"].b)
  # and back: the bnb tensors are the file's
  sd = ns["sd"]
  file = checkpoint.read_safetensors(cwd / "llama-bnb-4bit" / "model.safetensors")
  assert {k for k in file if k.startswith("model.layers.0.mlp.up_proj.")} == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(file[k]), err_msg=k)


@case("icq")
def _icq(world, cwd):
  params = {**mlp_params(0, 128, 1), "embed_tokens": {"embedding": jnp.ones((49, 128))}}
  ns, out = yield {"params": params, "key": jax.random.key(0)}
  assert "absmax+dq+icq" in out and 4.254 <= kernel_bits(out) < 4.27, out
  kernels = leaves_of(ns["qparams"], qz.QuantizedArray)
  assert kernels and all(q.tau is not None for q in kernels)
  assert len(kernels) == 2 and not leaves_of(ns["qparams"]["embed_tokens"], qz.QuantizedArray)
  lws = leaves_of(ns["params"], lj.LoraWeight)
  assert len(lws) == len(kernels)
  assert all(isinstance(lw.w, qz.QuantizedArray) and lw.w.tau is not None for lw in lws)


@case("gptq-modulora")
def _gptq_modulora(world, cwd):
  calibration_batches = [world.ids(20 + i, (4, 16)) for i in range(2)]
  ns, _ = yield {"params": world.params, "config": world.config, "key": jax.random.key(0),
                 "calibration_batches": calibration_batches}
  cfg, qbase, params = ns["cfg"], ns["qbase"], ns["params"]
  kernels = leaves_of(qbase, qz.GroupQuantizedArray)
  assert len(kernels) == 7 * world.config.num_hidden_layers
  assert all(q.bits == 3 and q.group_size == 128 and q.zeros is not None for q in kernels)
  # calibrated: on its calibration data GPTQ's logits are nearer the float model's
  # than round-to-nearest's
  fwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)
  ids = jnp.concatenate(calibration_batches)
  ref = llama.forward(world.params, world.config, ids)
  err = lambda q: float(jnp.mean((fwd(q, world.config, ids) - ref) ** 2))  # noqa: E731
  assert err(qbase) < err(qz.quantize(world.params, cfg))
  lws = leaves_of(params, lj.LoraWeight)
  assert len(lws) == len(kernels) and all(lw.w is not None for lw in lws)
  assert all(isinstance(lw.w, qz.GroupQuantizedArray) for lw in lws)


@case("quantized-checkpoints")
def _quantized_checkpoints(world, cwd):
  w4 = qz.quantize(world.params, qz.QuantConfig("int4", 128, symmetric=False,
                                                targets=r"layers/\d+/.*_proj/kernel"))
  shutil.copytree(world.root / "my-llama", cwd / "llama-w4g128")
  llama.save_hf(cwd / "llama-w4g128", world.config, w4)   # what llm-compressor writes
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
  adapter = random_b(lj.init(jax.random.key(3), world.params, cfg), 4)
  lj.save_adapter(cwd / "gptq-lora", adapter, cfg)
  ids = world.ids(5)
  ns, _ = yield {"ids": ids}

  params = ns["params"]
  groups = leaves_of(params, qz.GroupQuantizedArray)
  assert len(groups) == 7 * world.config.num_hidden_layers
  for got, want in zip(groups, leaves_of(w4, qz.GroupQuantizedArray)):
    np.testing.assert_array_equal(got.packed, want.packed)
  lora_on_w4 = jax.tree.map(
      lambda lw, q: dataclasses.replace(lw, w=q) if isinstance(lw, lj.LoraWeight) else q,
      adapter, w4, is_leaf=lambda x: isinstance(x, (lj.LoraWeight, qz.GroupQuantizedArray)))
  close(ns["y"], llama.forward(lj.merge(qz.dequantize(lora_on_w4)), world.config, ids), 1e-4)
  hf = json.loads((cwd / "out" / "config.json").read_text())
  assert hf["quantization_config"]["quant_method"] == "compressed-tensors"
  _, again = llama.load_hf(cwd / "out")
  for got, want in zip(leaves_of(again, qz.GroupQuantizedArray), groups):
    np.testing.assert_array_equal(got.packed, want.packed)


@case("merging")
def _merging(world, cwd):
  base = mlp_params(0, 32, 4)              # 4 layers of 32 x 32 kernels

  def finetune(seed):    # base + a rank-2 change of every kernel
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    low_rank = lambda: jax.random.normal(next(keys), (32, 2)) @ jax.random.normal(  # noqa: E731
        next(keys), (2, 32))
    return jax.tree.map(lambda x: x + 0.02 * low_rank(), base)

  ft1, ft2 = finetune(1), finetune(2)
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*_proj/kernel")
  ad1, ad2 = (random_b(lj.init(jax.random.key(s), base, cfg), s) for s in (3, 4))
  ns, out = yield {"ft1": ft1, "ft2": ft2, "base": base, "a": ft1, "b": ft2, "m1": ft1,
                   "m2": ft2, "ad1": ad1, "ad2": ad2, "finetuned": ft1}

  assert "arxiv.org/abs/2306.01708" in out       # TIES' paper
  q = lambda m, i: m["layers"][i]["self_attn"]["q_proj"]["kernel"]  # noqa: E731
  up = lambda m, i: m["layers"][i]["mlp"]["up_proj"]["kernel"]  # noqa: E731
  merged = ns["merged"]                          # slerp: self_attn t = 0 on layer 0, 1 on 3
  close(q(merged, 0), q(ft1, 0))
  close(q(merged, 3), q(ft2, 3))
  assert not np.allclose(up(merged, 0), up(ft1, 0))
  deeper = ns["deeper"]
  assert len(deeper["layers"]) == 6
  close(q(deeper, 2), q(ft1, 2))
  close(q(deeper, 3), q(ft2, 1))
  # svd at rank 8 >= 4 + 4 is the exact weighted sum of the two adapters' deltas
  delta = lambda ad: up(lj.merge(ad), 1) - up(base, 1)  # noqa: E731
  assert up(ns["adapter"], 1).a.shape == (32, 8)
  close(delta(ns["adapter"]), 0.5 * delta(ad1) + 0.5 * delta(ad2), 1e-4)
  lora, rel_err = ns["lora"], ns["rel_err"]
  assert max(rel_err.values()) < 1e-3, rel_err   # the change is rank 2 <= 16
  close(delta(lora), up(ft1, 1) - up(base, 1), 1e-4)


@case("multi-lora-serving")
def _multi_lora_serving(world, cwd):
  k = jax.random.split(jax.random.key(0), 3)
  base = {"up": jax.random.normal(k[0], (8, 16)) / 3, "down": jax.random.normal(k[1], (16, 4))}
  apply_fn = lambda p, x: jnp.tanh(x @ p["up"]) @ p["down"]  # noqa: E731
  adapters = [random_b(lj.init(jax.random.key(s), base,
                               lj.LoraConfig(rank=r, alpha=4, targets="up|down")), s, 0.3)
              for s, r in ((1, 2), (2, 4), (3, 3))]
  x = jax.random.normal(k[2], (4, 8))
  ns, _ = yield {"lora_params_1": adapters[0], "lora_params_2": adapters[1],
                 "lora_params_3": adapters[2], "apply_fn": apply_fn, "x": x}

  y, ids = ns["y"], ns["ids"]
  assert y.shape == (4, 4)
  rows = [base if i < 0 else lj.merge(adapters[i]) for i in np.asarray(ids)]
  for n, p in enumerate(rows):
    close(y[n], apply_fn(p, x[n]))
  # slot 1 now serves adapter 3
  y2 = lj.implicit(apply_fn)(lj.with_adapter_ids(ns["served"], ids), x)
  close(y2[1], apply_fn(lj.merge(adapters[2]), x[1]))
  close(y2[0], y[0])


@case("sharding")
def _sharding(world, cwd):
  assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  config = world.config
  base = llama.stack_layers(world.params)
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=r"layers/(self_attn|mlp)/\w+_proj/kernel",
                      layouts=llama.STACKED_LAYOUTS)
  params = random_b(lj.init(jax.random.key(1), base, cfg), 2)

  def loss_fn(adapter, frozen, ids):
    logits = lj.implicit(llama.forward)(lj.combine(adapter, frozen), config, ids[:, :-1])
    lp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))

  ids = world.ids(6, (4, 16))
  ns, out = yield {"params": params, "loss_fn": loss_fn, "ids": ids}

  assert "LoraWeight(w=PartitionSpec(None, 'model', None), a=PartitionSpec(None, 'model', None), " \
         "b=PartitionSpec(None, None, None)" in out.replace("P(", "PartitionSpec("), out
  down = ns["params"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert down.w.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  assert len(down.a.sharding.device_set) == 8
  loss_1dev, grads_1dev = jax.value_and_grad(loss_fn)(*lj.split(params), ids)
  close(ns["loss"], loss_1dev, 1e-5)
  close(ns["grads"]["layers"]["mlp"]["down_proj"]["kernel"].b,
        grads_1dev["layers"]["mlp"]["down_proj"]["kernel"].b, 1e-4)
