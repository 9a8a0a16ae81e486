"""The packages' one-way, public seams (docs/ARCHITECTURE.md): `quantization` and
`merging` import only public `lora_jax` names, `lora_jax` imports neither of them, and
no source file cites a document outside the repository."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path):
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.lineno, node.module
      for a in node.names:
        yield node.lineno, f"{node.module}.{a.name}"


@pytest.mark.parametrize("package", ["quantization", "merging", "training", "serving"])
def test_dependent_packages_import_only_public_lora_jax_names(package):
  bad = [f"{p.relative_to(ROOT)}:{line}: {name}"
         for p in sorted((ROOT / package).rglob("*.py"))
         for line, name in _imports(p)
         if name.startswith("lora_jax") and any(part.startswith("_")
                                                for part in name.split(".")[1:])]
  assert not bad, "private lora_jax imports:\n" + "\n".join(bad)


def test_lora_jax_core_imports_neither_quantization_nor_merging():
  # lora_jax/models/ is a consumer of all packages (the reference model loads bnb-4bit
  # checkpoints as QuantizedArray leaves); the core below it never imports them.
  bad = [f"{p.relative_to(ROOT)}:{line}: {name}"
         for p in sorted((ROOT / "lora_jax").rglob("*.py")) if "models" not in p.parts
         for line, name in _imports(p)
         if name.split(".")[0] in ("quantization", "merging")]
  assert not bad, "\n".join(bad)


def test_no_source_file_cites_a_document_outside_the_repository():
  for package in ("lora_jax", "quantization", "merging", "training", "serving"):
    for p in (ROOT / package).rglob("*.py"):
      text = p.read_text()
      assert "DESIGN.md" not in text and "../shared" not in text, p
