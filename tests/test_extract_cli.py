"""`lora-jax extract-lora` against `mergekit-extract-lora` run at test time on the same
tiny checkpoints: same tensors (LoRA products within float32 SVD precision, full-rank
modules equal), same config; the adapter loads in ours and in PEFT, and at full rank it
reproduces the fine-tuned model."""

import json
import os

import jax
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import llama
from merging import cli

pytestmark = [pytest.mark.interop]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("mergekit")
from test_merging_cli import load_dir, make_llama  # noqa: E402

IDS = np.random.RandomState(0).randint(0, 64, (2, 10))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("extract")
  return make_llama(root / "base", 0), make_llama(root / "ft", 1), root


def _mergekit(ft, base, out, *extra):
  from mergekit.scripts.extract_lora import main
  main(["--model", ft, "--base-model", base, "--out-path", str(out), *extra],
       standalone_mode=False)


def _ours(ft, base, out, *extra):
  assert cli.main(["extract-lora", "--model", ft, "--base-model", base, "--out-path",
                   str(out), "--quiet", *extra]) == 0


@pytest.mark.parametrize("extra", [["--max-rank", "8"],
                                   ["--max-rank", "4", "--no-distribute-scale"],
                                   ["--max-rank", "6", "--embed-lora", "-e", "mlp"]],
                         ids=["rank8", "no_distribute", "embed_lora_exclude"])
def test_extract_equals_mergekit(models, extra):
  base, ft, root = models
  name = "_".join(extra).replace("-", "")
  mk, ours = root / f"mk{name}", root / f"ours{name}"
  _mergekit(ft, base, mk, *extra)
  _ours(ft, base, ours, *extra)
  a, b = load_dir(mk), load_dir(ours)
  assert sorted(a) == sorted(b)
  for k in a:
    if "_A" in k.rsplit(".", 2)[-2] or k.endswith("_A"):
      kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
      # singular vectors are defined up to sign: compare the products
      np.testing.assert_allclose(b[kb] @ b[k], a[kb] @ a[k], atol=2e-6, err_msg=k)
      assert b[k].shape == a[k].shape and b[k].dtype == a[k].dtype, k
    elif "lora_" not in k:
      np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  ca = json.loads((mk / "adapter_config.json").read_text())
  cb = json.loads((ours / "adapter_config.json").read_text())
  for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "use_rslora"):
    assert ca[key] == cb[key], key
  for key in ("target_modules", "modules_to_save"):
    assert sorted(ca[key]) == sorted(cb[key]), key


def test_full_rank_extraction_reproduces_the_finetuned_model(models):
  base, ft, root = models
  out = root / "full"
  _ours(ft, base, out, "--max-rank", "64")
  config, base_params = llama.load_hf(base)
  _, ft_params = llama.load_hf(ft)
  adapted = lj.load_adapter(out, base_params)
  want = llama.forward(ft_params, config, IDS)
  np.testing.assert_allclose(jax.jit(lj.implicit(llama.forward), static_argnums=1)(
      adapted, config, IDS), want, atol=2e-4)
  m = transformers.LlamaForCausalLM.from_pretrained(base).eval()
  pm = peft.PeftModel.from_pretrained(m, str(out)).eval()
  with torch.no_grad():
    np.testing.assert_allclose(pm(torch.tensor(IDS)).logits.numpy(), want, atol=2e-4)


def test_extract_errors(models, tmp_path, capsys):
  base, ft, root = models
  other = make_llama(tmp_path / "wide", 2, hidden=48)
  assert cli.main(["extract-lora", "--model", other, "--base-model", base, "--out-path",
                   str(tmp_path / "x"), "--quiet"]) == 2
  import re
  assert re.search(r"tensor model\.layers\.0\.\S+\.weight: shape \[\d+, \d+\] in \S*wide but "
                   r"\[\d+, \d+\] in \S*base", capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "x")
  assert cli.main(["extract-lora", "--model", ft, "--base-model", base, "--out-path",
                   str(tmp_path / "y"), "-i", "nothing_matches", "--quiet"]) == 2
  assert "no module to extract" in capsys.readouterr().err
  (tmp_path / "z").mkdir()
  assert cli.main(["extract-lora", "--model", ft, "--base-model", base, "--out-path",
                   str(tmp_path / "z"), "--quiet"]) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err
