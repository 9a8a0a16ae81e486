"""`lora-jax serve --model BASE_DIR [--adapters DIR] ...`: the OpenAI-compatible server."""

from __future__ import annotations

import pathlib
import socket
import sys


def add_parser(sub) -> None:
  s = sub.add_parser("serve", help="serve a Hugging Face checkpoint and its LoRA adapters "
                     "behind an OpenAI-compatible HTTP API")
  s.add_argument("--model", required=True, metavar="BASE_DIR",
                 help="Hugging Face model directory (quantized checkpoints included)")
  s.add_argument("--adapters", default=None, metavar="DIR",
                 help="directory of PEFT adapter directories, each served under its name; "
                      "runtime loads (/v1/load_lora_adapter) are read only from inside it")
  s.add_argument("--max-adapters", type=int, default=8, metavar="N",
                 help="device bank slots: adapters resident at once (LRU beyond); 0: the "
                      "base alone, no bank")
  s.add_argument("--max-rank", type=int, default=16, metavar="R",
                 help="largest adapter rank the bank holds")
  s.add_argument("--max-batch", type=int, default=8, metavar="B",
                 help="requests decoded together (rows of the KV cache)")
  s.add_argument("--max-model-len", type=int, default=None, metavar="S",
                 help="context per request, prompt + completion (default: the model's "
                      "max_position_embeddings, at most 2048)")
  s.add_argument("--served-model-name", default=None, metavar="NAME",
                 help="the base's name in the API (default: the directory's name)")
  s.add_argument("--host", default="127.0.0.1")
  s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
  s.add_argument("--stacked", action="store_true",
                 help="hold the layers stacked (one scanned layer: faster compile)")


def _eos_ids(model_dir: pathlib.Path, tokenizer) -> list[int]:
  """The tokenizer's eos and generation_config.json's `eos_token_id` (int or list)."""
  from lora_jax import checkpoint
  ids = set() if tokenizer.eos_id is None else {int(tokenizer.eos_id)}
  gen = model_dir / "generation_config.json"
  if gen.is_file():
    e = checkpoint.read_json(checkpoint.inside(model_dir, "generation_config.json",
                                               str(model_dir)), "generation_config.json"
                             ).get("eos_token_id")
    for x in (e if isinstance(e, list) else [e]):
      if isinstance(x, int) and not isinstance(x, bool):
        ids.add(x)
  return sorted(ids)


def build(args):
  """(app, server) for parsed `args`, the model loaded."""
  from lora_jax import models
  from serving.app import Server, make_app
  from serving.bank import AdapterBank
  from serving.engine import Engine
  from training.data import load_tokenizer

  model_dir = pathlib.Path(args.model)
  if not model_dir.is_dir():
    raise FileNotFoundError(f"{model_dir}: model directory not found")
  config, params = models.load_hf(model_dir, stacked=args.stacked)
  tok = load_tokenizer(model_dir)
  max_len = args.max_model_len or min(int(config.max_position_embeddings), 2048)
  if max_len > config.max_position_embeddings or max_len < 2:
    raise ValueError(f"--max-model-len {max_len}: must be in [2, max_position_embeddings="
                     f"{config.max_position_embeddings}]")
  for flag, v in (("--max-rank", args.max_rank), ("--max-batch", args.max_batch)):
    if v < 1:
      raise ValueError(f"{flag} {v}: must be >= 1")
  if args.max_adapters < 0:
    raise ValueError(f"--max-adapters {args.max_adapters}: must be >= 0 (0: the base alone)")
  bank = AdapterBank(params, config, slots=args.max_adapters, max_rank=args.max_rank)
  root = None
  if args.adapters is not None:
    root = pathlib.Path(args.adapters)
    if not root.is_dir():
      raise FileNotFoundError(f"--adapters {root}: not a directory")
    for d in sorted(root.iterdir()):
      if (d.is_dir() and not d.is_symlink() and (d / "adapter_config.json").is_file()
          and args.max_adapters > 0):
        bank.register(d.name, d)
  engine = Engine(config, bank, max_batch=args.max_batch, max_len=max_len,
                  eos_ids=_eos_ids(model_dir, tok))
  server = Server(engine, tok, args.served_model_name or model_dir.resolve().name, root)
  return make_app(server), server


def _uvicorn_server():
  import signal
  import uvicorn

  class Server(uvicorn.Server):
    """uvicorn's server, but SIGTERM (a service manager's stop) ends with exit code 0
    after the graceful shutdown; uvicorn re-raises it, which exits with -15."""

    def handle_exit(self, sig, frame):
      super().handle_exit(sig, frame)
      captured = getattr(self, "_captured_signals", None)
      if sig == signal.SIGTERM and captured and captured[-1] == sig:
        captured.pop()
  return Server


def run_args(args) -> None:
  import uvicorn
  _Server = _uvicorn_server()
  app, server = build(args)
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((args.host, args.port))
  host, port = sock.getsockname()[:2]
  print(f"lora-jax serve: {server.base_name} with {len(server.engine.bank.sources)} adapters "
        f"on http://{host}:{port}/v1", flush=True)
  cfg = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
  _Server(cfg).run(sockets=[sock])
  print("lora-jax serve: stopped", file=sys.stderr, flush=True)


__all__ = ["add_parser", "build", "run_args"]
