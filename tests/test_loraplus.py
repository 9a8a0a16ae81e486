"""LoRA+ (`lj.loraplus`): `b` learns `ratio` times faster than `a`, in PEFT's groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj


def _adapter():
  k = jax.random.split(jax.random.key(0), 4)
  base = {"embed_tokens": {"embedding": jax.random.normal(k[0], (32, 8))},
          "q_proj": {"kernel": jax.random.normal(k[1], (8, 8))},
          "v_proj": {"kernel": jax.random.normal(k[2], (8, 8))},
          "head": {"kernel": jax.random.normal(k[3], (8, 4))}}
  params = lj.init(jax.random.key(1), base, lj.LoraConfig(
      rank=2, targets=r"(q_proj|v_proj)/kernel|embed_tokens/embedding", init="gaussian",
      modules_to_save="head/kernel"))
  params["v_proj"]["kernel"] = lj.to_dora(params["v_proj"]["kernel"])
  return lj.split(params)[0]


def test_sgd_updates_scale_as_promised():
  adapter = _adapter()
  grads = jax.tree.map(jnp.ones_like, adapter)
  opt = lj.loraplus(optax.sgd, 0.1, ratio=16.0)
  updates, _ = opt.update(grads, opt.init(adapter), adapter)
  q, v = updates["q_proj"]["kernel"], updates["v_proj"]["kernel"]
  np.testing.assert_allclose(q.a, -0.1)
  np.testing.assert_allclose(q.b, -1.6)
  np.testing.assert_allclose(v.a, -0.1)
  np.testing.assert_allclose(v.b, -1.6)
  np.testing.assert_allclose(v.m, -1.6)            # 1-D trainable: PEFT's group B
  np.testing.assert_allclose(updates["head"]["kernel"].value, -0.1)   # modules_to_save, 2-D
  e = updates["embed_tokens"]["embedding"]
  np.testing.assert_allclose(e.a, -1e-6)
  np.testing.assert_allclose(e.b, -1e-6)


def test_stacked_dora_magnitudes_and_iec_betas_are_group_b():
  """Per layer these are 1-D (PEFT's lora_magnitude_vector (out,), IR-QLoRA's betas
  [1]), so group B, also when layers are stacked in front."""
  w = {"w": jax.random.normal(jax.random.key(4), (3, 8, 8))}
  dora = lj.init(jax.random.key(5), w, lj.LoraConfig(rank=2, targets="w", use_dora=True,
                                                      layouts={"w": "lio"}))
  iec = lj.init(jax.random.key(5), w, lj.LoraConfig(rank=2, targets="w", use_iec=True,
                                                     layouts={"w": "lio"}))
  assert lj.loraplus_labels(lj.split(dora)[0])["w"].m == "b"
  labels = lj.loraplus_labels(lj.split(iec)[0])["w"]
  assert (labels.a, labels.b, labels.beta_a, labels.beta_b) == ("a", "b", "b", "b")
  single = lj.init(jax.random.key(5), {"w": w["w"][0]}, lj.LoraConfig(
      rank=2, targets="w", use_iec=True))
  assert lj.loraplus_labels(lj.split(single)[0])["w"].beta_a == "b"


def test_schedules_and_adam_keep_the_ratio(standard_promotion):
  adapter = _adapter()
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), adapter)
  sched = optax.linear_schedule(1e-3, 0.0, 10)
  opt = lj.loraplus(optax.adam, sched, ratio=4.0, embedding_targets=None)
  updates, _ = opt.update(grads, opt.init(adapter), adapter)
  q = updates["q_proj"]["kernel"]
  # adam's first step is lr * sign(g) (up to eps): b's is 4x a's
  np.testing.assert_allclose(np.abs(q.a), 1e-3, rtol=1e-4)
  np.testing.assert_allclose(np.abs(q.b), 4e-3, rtol=1e-4)
  e = updates["embed_tokens"]["embedding"]
  np.testing.assert_allclose(np.abs(e.b), 4e-3, rtol=1e-4)       # no embedding group asked


@pytest.mark.interop
def test_groups_equal_peft_create_loraplus_optimizer():
  """PEFT's optimizer groups at test time: lora_A, lora_B, DoRA magnitudes, modules_to_save
  and embedding LoRA get the same learning rates as ours for the same modules."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from peft.optimizers import create_loraplus_optimizer

  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_tokens = torch.nn.Embedding(32, 8)
      self.q_proj = torch.nn.Linear(8, 8, bias=False)
      self.v_proj = torch.nn.Linear(8, 8, bias=False)
      self.head = torch.nn.Linear(8, 4, bias=False)

  m = peft.get_peft_model(M(), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                               modules_to_save=["head"]))
  m2 = peft.get_peft_model(M(), peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
  lrs = {}
  for model in (m, m2):
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=16.0)
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
      for p in g["params"]:
        lrs[ids[id(p)]] = g["lr"]
  peft_lr = lambda pat: {lrs[n] for n in lrs if pat in n}  # noqa: E731
  adapter = _adapter()
  labels = lj.loraplus_labels(adapter)
  group_lr = {"a": 0.1, "b": 1.6, "embedding": 1e-6}
  ours = lambda x: group_lr[x]  # noqa: E731
  assert peft_lr("q_proj.lora_A") == {ours(labels["q_proj"]["kernel"].a)}
  assert peft_lr("q_proj.lora_B") == {ours(labels["q_proj"]["kernel"].b)}
  assert peft_lr("lora_magnitude_vector") == {ours(labels["v_proj"]["kernel"].m)}
  assert peft_lr("head.modules_to_save") == {ours(labels["head"]["kernel"].value)}
  assert peft_lr("embed_tokens.lora_embedding_A") == {ours(labels["embed_tokens"]["embedding"].a)}
  assert peft_lr("embed_tokens.lora_embedding_B") == {ours(labels["embed_tokens"]["embedding"].b)}


def test_bad_ratio():
  with pytest.raises(ValueError, match="ratio must be positive"):
    lj.loraplus(optax.sgd, 0.1, ratio=0)
