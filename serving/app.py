"""The OpenAI-compatible HTTP API over an `Engine` (a Starlette ASGI app).

Endpoints (as OpenAI's and vLLM's):
- `GET /v1/models`: the base and every registered adapter (`parent`: the base);
- `POST /v1/completions` and `POST /v1/chat/completions` (chat template from the
  tokenizer), streaming (server-sent events, ending `data: [DONE]`) or not; `model`
  names the base or an adapter, as vLLM's `--enable-lora`; an unknown name is a 404;
- `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and
  `POST /v1/unload_lora_adapter` `{"lora_name"}` (vLLM's runtime registration);
- `GET /health`.
Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx
status; the engine keeps serving. A streaming client that disconnects cancels its
request, which frees its row and its adapter slot.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from lora_jax import checkpoint
from serving.bank import AdapterError
from serving.engine import Engine, Request, Sampling

MAX_BODY_BYTES = 8 << 20


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(e: ApiError) -> JSONResponse:
  return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                 "code": e.status}}, status_code=e.status)


class TextStream:
  """Token ids -> text deltas, holding back what may still become a stop string or an
  incomplete UTF-8 character. `push(id)` returns (delta, stopped)."""

  def __init__(self, tokenizer, stop: list[str]):
    self.tok, self.stop = tokenizer, [s for s in stop if s]
    self.ids: list[int] = []
    self.sent = 0
    self.text = ""
    self.hold = max((len(s) for s in self.stop), default=1) - 1

  def push(self, tid: int) -> tuple[str, bool]:
    self.ids.append(tid)
    text = self.tok.decode(self.ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
    if hits:
      self.text = text[:min(hits)]
      delta, self.sent = self.text[self.sent:], len(self.text)
      return delta, True
    self.text = text
    safe = len(text) - self.hold
    if text.endswith("\ufffd"):
      safe = min(safe, len(text) - 1)
    if safe <= self.sent:
      return "", False
    delta, self.sent = text[self.sent:safe], safe
    return delta, False

  def flush(self) -> str:
    text = self.text.rstrip("\ufffd") if self.text.endswith("\ufffd") else self.text
    delta, self.sent = text[self.sent:], len(text)
    return delta


# -- request bodies ----------------------------------------------------------------

_IGNORED = {"user", "stream_options", "logit_bias", "service_tier", "store", "metadata"}
_UNSUPPORTED = {"logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "tool_choice",
                "functions", "function_call", "response_format", "n"}


def _number(body, name, kind, default, lo=None, hi=None):
  v = body.get(name, default)
  if v is None:
    return default
  ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else (
      isinstance(v, (int, float)) and not isinstance(v, bool))
  if not ok:
    raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got "
                   f"{json.dumps(v)[:40]}", name)
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ApiError(400, f"'{name}' is {v}; it must be in [{lo}, {hi}]", name)
  return kind(v)


def _sampling(body: dict, engine: Engine) -> tuple[Sampling, list[str], bool]:
  for k in body:     # the default value of an unsupported option is accepted
    if k in _UNSUPPORTED and body[k] not in (None, False, 1 if k in ("n", "best_of") else None):
      raise ApiError(400, f"'{k}' is not supported by this server", k)
  for k in ("presence_penalty", "frequency_penalty"):
    if body.get(k) not in (None, 0, 0.0):
      raise ApiError(400, f"'{k}' is not supported by this server (only 0)", k)
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 16, 1, None)
  s = Sampling(
      max_tokens=max_tokens,
      temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
      top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0),
      top_k=_number(body, "top_k", int, 0, -1, None),
      seed=_number(body, "seed", int, None, -(2**63), 2**63 - 1))
  if s.top_p <= 0.0:
    raise ApiError(400, "'top_p' must be > 0", "top_p")
  s.top_k = max(s.top_k, 0)
  stop = body.get("stop")
  if stop is None:
    stop = []
  elif isinstance(stop, str):
    stop = [stop]
  elif not (isinstance(stop, list) and all(isinstance(x, str) for x in stop) and len(stop) <= 8):
    raise ApiError(400, "'stop' must be a string or a list of at most 8 strings", "stop")
  s.ignore_eos = body.get("ignore_eos", False)
  if not isinstance(s.ignore_eos, bool):
    raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise ApiError(400, "'stream' must be true or false", "stream")
  return s, stop, stream


class Server:
  """The app's state: engine thread, tokenizer, names."""

  def __init__(self, engine: Engine, tokenizer, base_name: str,
               adapter_root: pathlib.Path | None = None):
    self.engine, self.tok, self.base_name = engine, tokenizer, base_name
    self.adapter_root = adapter_root
    self.created = int(time.time())
    self._stop = threading.Event()
    self._thread = threading.Thread(target=engine.run, args=(self._stop,), daemon=True,
                                    name="lora-jax-engine")

  def start(self):
    self._thread.start()

  def shutdown(self):
    self._stop.set()
    self._thread.join(timeout=30)

  # -- helpers --------------------------------------------------------------------
  def adapter_of(self, body: dict) -> str | None:
    name = body.get("model")
    if name is None or name == self.base_name:
      return None
    if not isinstance(name, str):
      raise ApiError(400, "'model' must be a string", "model")
    if name not in self.engine.bank.sources:
      raise ApiError(404, f"The model `{name}` does not exist. Served: "
                     f"{[self.base_name] + self.engine.bank.names()}", "model",
                     "NotFoundError")
    return name

  async def body(self, request: HttpRequest) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
      raise ApiError(413, f"request body of {len(raw)} bytes; at most {MAX_BODY_BYTES}")
    try:
      body = checkpoint.loads_json(raw.decode("utf-8"), allow_nan=False)
    except UnicodeDecodeError:
      raise ApiError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as e:
      raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                     f"column {e.colno}") from None
    except (ValueError, RecursionError) as e:
      raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
      raise ApiError(400, "request body must be a JSON object")
    return body

  async def _check_adapter(self, adapter: str | None) -> None:
    if adapter is None:
      return
    try:       # parse (disk, host cache) before answering, so a bad adapter is a 4xx
      await asyncio.to_thread(self.engine.bank.parse, adapter)
    except AdapterError as e:
      raise ApiError(400, str(e), "model") from None
    except KeyError:
      raise ApiError(404, f"The model `{adapter}` does not exist.", "model",
                     "NotFoundError") from None

  def _submit(self, prompt: list[int], adapter, sampling: Sampling, stop: list[str]):
    """Submit one generation; returns (request, asyncio queue of events, TextStream)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    text = TextStream(self.tok, stop)

    def on_token(tid):
      delta, stopped = text.push(tid)
      if delta:
        loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))
      return not stopped

    def on_done(reason, error):
      rest = text.flush() if reason != "stop" or not text.stop else ""
      if rest:
        loop.call_soon_threadsafe(queue.put_nowait, ("delta", rest))
      loop.call_soon_threadsafe(queue.put_nowait, ("done", reason, error))

    req = Request(prompt=prompt, sampling=sampling, on_token=on_token, on_done=on_done,
                  adapter=adapter)
    why = self.engine.check(len(prompt), sampling.max_tokens)
    if why:
      raise ApiError(400, why, "max_tokens" if len(prompt) < self.engine.S else "prompt")
    self.engine.submit(req)
    return req, queue, text

  async def _collect(self, req, queue) -> tuple[str, str]:
    parts = []
    try:
      while True:
        ev = await queue.get()
        if ev[0] == "delta":
          parts.append(ev[1])
        else:
          _, reason, error = ev
          if reason == "error":
            raise ApiError(400 if "unloaded" in (error or "") else 500, error or "error",
                           kind="server_error")
          return "".join(parts), reason
    except asyncio.CancelledError:
      self.engine.cancel(req)
      raise

  # -- endpoints --------------------------------------------------------------------
  async def models(self, request: HttpRequest):
    data = [{"id": self.base_name, "object": "model", "created": self.created,
             "owned_by": "lora-jax", "root": self.base_name, "parent": None}]
    data += [{"id": n, "object": "model", "created": self.created, "owned_by": "lora-jax",
              "root": n, "parent": self.base_name}
             for n in self.engine.bank.names()]
    return JSONResponse({"object": "list", "data": data})

  async def health(self, request: HttpRequest):
    """Liveness and counters: running / waiting requests, adapters resident in the
    bank, adapter loads into it, compiles of each step kind, decode steps."""
    e = self.engine
    return JSONResponse({"status": "ok", "running": sum(r is not None for r in e.rows),
                         "waiting": len(e.waiting), "resident": e.bank.resident(),
                         "adapter_loads": e.bank.loads, "compiles": dict(e.traces),
                         "decode_steps": e.steps})

  async def completions(self, request: HttpRequest):
    return await self._generate(request, chat=False)

  async def chat(self, request: HttpRequest):
    return await self._generate(request, chat=True)

  def _prompts(self, body: dict, chat: bool) -> list[list[int]]:
    if chat:
      msgs = body.get("messages")
      if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
      try:
        from training import data as tdata
        tdata.check_messages(msgs, "messages")
        text = self.tok.render_chat(msgs, add_generation_prompt=True)
      except ValueError as e:
        raise ApiError(400, str(e), "messages") from None
      return [self.tok.encode(text, add_special_tokens=False)]
    p = body.get("prompt")
    if isinstance(p, str):
      p = [p]
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool)
                                         for x in p):
      p = [p]
    if not (isinstance(p, list) and p and len(p) <= 64):
      raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids",
                     "prompt")
    from training.data import prompt_ids
    out = []
    V = self.engine.config.vocab_size
    for x in p:
      if isinstance(x, str):
        out.append(prompt_ids(self.tok, x))
      elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                             and 0 <= t < V for t in x):
        out.append(list(x))
      else:
        raise ApiError(400, f"'prompt' entries must be strings or lists of token ids in "
                       f"[0, {V})", "prompt")
    return out

  async def _generate(self, request: HttpRequest, chat: bool):
    try:
      body = await self.body(request)
      adapter = self.adapter_of(body)
      sampling, stop, stream = _sampling(body, self.engine)
      prompts = self._prompts(body, chat)
      if stream and len(prompts) > 1:
        raise ApiError(400, "streaming takes one prompt", "prompt")
      await self._check_adapter(adapter)
      subs = []
      try:
        for i, p in enumerate(prompts):
          s = Sampling(**vars(sampling))
          if s.seed is not None:
            s.seed += i
          subs.append(self._submit(p, adapter, s, stop))
      except BaseException:
        for req, _, _ in subs:
          self.engine.cancel(req)
        raise
    except ApiError as e:
      return _error(e)
    name = body.get("model") or self.base_name
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if stream:
      return StreamingResponse(self._events(request, subs[0], rid, created, name, chat,
                                            len(prompts[0])),
                               media_type="text/event-stream")
    try:
      results = await asyncio.gather(*(self._collect(r, q) for r, q, _ in subs))
    except ApiError as e:
      return _error(e)
    n_prompt = sum(len(p) for p in prompts)
    n_out = sum(r.made for r, _, _ in subs)
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
             "total_tokens": n_prompt + n_out}
    if chat:
      choices = [{"index": i, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(results)]
      obj = "chat.completion"
    else:
      choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(results)]
      obj = "text_completion"
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                         "choices": choices, "usage": usage})

  async def _events(self, request, sub, rid, created, name, chat, n_prompt):
    req, queue, _ = sub
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, reason: str | None, first: bool = False):
      if chat:
        d = {"role": "assistant", "content": ""} if first else (
            {"content": delta} if delta else {})
        choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
      else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
      return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                    "model": name, "choices": [choice]}) + "\n\n"
    try:
      if chat:
        yield chunk(None, None, first=True)
      while True:
        try:
          ev = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            self.engine.cancel(req)
            return
          continue
        if ev[0] == "delta":
          yield chunk(ev[1], None)
          continue
        _, reason, error = ev
        if reason == "error":
          yield "data: " + json.dumps({"error": {"message": error, "type": "server_error",
                                                 "param": None, "code": 500}}) + "\n\n"
        else:
          yield chunk(None, reason if reason != "cancelled" else "stop")
        yield "data: [DONE]\n\n"
        return
    finally:
      self.engine.cancel(req)       # a no-op once finished; frees the row otherwise

  async def load_adapter(self, request: HttpRequest):
    try:
      body = await self.body(request)
      name, path = body.get("lora_name"), body.get("lora_path")
      if not isinstance(name, str) or not name or name == self.base_name:
        raise ApiError(400, "'lora_name' must be a non-empty string other than the base's",
                       "lora_name")
      if not isinstance(path, str):
        raise ApiError(400, "'lora_path' must be a string", "lora_path")
      if self.adapter_root is None:
        raise ApiError(400, "this server loads adapters only from the directory named by "
                       "--adapters, and none was given", "lora_path")
      try:      # nothing is read from outside the directory the user named
        rel = pathlib.Path(path)
        if rel.is_absolute():
          rel = rel.resolve().relative_to(self.adapter_root.resolve())
        p = checkpoint.inside(self.adapter_root, str(rel), str(self.adapter_root))
      except ValueError as e:
        raise ApiError(400, f"lora_path {path!r} is not inside {self.adapter_root}: {e}",
                       "lora_path") from None
      if name in self.engine.bank.sources:
        raise ApiError(400, f"adapter {name!r} is already loaded", "lora_name")
      try:
        self.engine.bank.register(name, p)
        await asyncio.to_thread(self.engine.bank.parse, name)
      except AdapterError as e:
        self.engine.bank.sources.pop(name, None)
        raise ApiError(400, str(e), "lora_path") from None
    except ApiError as e:
      return _error(e)
    return JSONResponse({"status": "ok", "lora_name": name})

  async def unload_adapter(self, request: HttpRequest):
    try:
      body = await self.body(request)
      name = body.get("lora_name")
      try:
        self.engine.bank.unregister(name)
      except (KeyError, TypeError):
        raise ApiError(404, f"The model `{name}` does not exist.", "lora_name",
                       "NotFoundError") from None
    except ApiError as e:
      return _error(e)
    return JSONResponse({"status": "ok", "lora_name": name})


def make_app(server: Server) -> Starlette:
  """The ASGI app; the engine thread starts and stops with the app's lifespan."""
  import contextlib

  @contextlib.asynccontextmanager
  async def lifespan(app):
    server.start()
    try:
      yield
    finally:
      server.shutdown()

  routes = [Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/load_lora_adapter", server.load_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", server.unload_adapter, methods=["POST"])]
  return Starlette(routes=routes, lifespan=lifespan)


__all__ = ["Server", "TextStream", "make_app", "ApiError"]
