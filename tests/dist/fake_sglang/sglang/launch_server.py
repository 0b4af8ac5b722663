"""``python -m sglang.launch_server``: CPU stand-ins for an SGLang 0.5.23 server, launched as
the trainer launches SGLang (this directory on PYTHONPATH).

* By default the faithful stand-in (:mod:`sglang.standin`): a real transformers model of the
  served checkpoint, one process per TP rank on its GPU of the emulated accelerator, SGLang's
  sampler, weight updates, memory saver and KV sizing.
* With the environment variable FAKE_SGLANG (JSON of FakeSGLang keywords), or in-process as
  ``FakeSGLang(**behaviour).start()``: the fast fake-token server below, for the client's
  error paths (token delays, servers dying mid-batch, 503s). It speaks the same native HTTP
  endpoints with their request/response JSON (http_server.py / io_struct.py); output token t of
  a request is a function of its prompt, its sampling_seed and t, its logprob
  -(token % 7 + 1) / 10, and pushed weights are stored, not used.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pickle
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# SafeUnpickler.ALLOWED_GLOBALS of the pinned wheel (sglang/srt/utils/common.py), extracted
# into the protocol fixture by tools/extract_sglang_protocol.py.
PROTOCOL = Path(__file__).resolve().parents[3] / "fixtures" / "sglang_protocol.json"


class SafeUnpickler(pickle.Unpickler):
    """SGLang's SafeUnpickler: globals outside the allow-list are refused."""

    allowed: set | None = None

    def find_class(self, module, name):
        if SafeUnpickler.allowed is None:
            SafeUnpickler.allowed = {tuple(g) for g in
                                     json.loads(PROTOCOL.read_text())["safe_unpickler_globals"]}
        if (module, name) in SafeUnpickler.allowed:
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle "
                           "deserialization")


def fake_token(prompt: list[int], seed: int, t: int) -> int:
    return (sum(prompt) * 31 + seed * 7 + t * 13) % 97 + 3


def fake_logprob(token: int) -> float:
    return -((token % 7) + 1) / 10


def unflatten(flat: torch.Tensor, names, dtypes, shapes) -> dict[str, torch.Tensor]:
    """FlattenedTensorBucket layout: contiguous, in order, offsets aligned to the dtype."""
    import torch  # here, not at the top: the stand-in's HTTP process never needs torch

    out, offset = {}, 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        size = torch.Size(shape).numel() * dtype.itemsize
        if offset % dtype.itemsize:
            raise ValueError(f"Unaligned received tensor {name}")
        out[name] = flat[offset:offset + size].view(dtype).reshape(shape).clone()
        offset += size
    return out


class FakeSGLang:
    """Behaviour: ``token_delay_s`` per generated token (aborts honoured between tokens);
    ``die_on_generate``: the k-th /generate call (1-based) kills the server mid-request,
    unless the file ``die_marker`` exists (it is created then: a restarted process lives);
    ``fail_503``: answer that many /generate calls with 503 first; ``healthy``: /health 200;
    ``tp_size``: reported in /server_info."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token_delay_s: float = 0.0,
                 die_on_generate: int | None = None, die_marker: str | None = None,
                 fail_503: int = 0, healthy: bool = True,
                 tp_size: int = 1, model_path: str = "fake"):
        self.behaviour = dict(token_delay_s=token_delay_s, die_on_generate=die_on_generate,
                              die_marker=die_marker, healthy=healthy, tp_size=tp_size)
        self.fail_503 = fail_503
        self.model_path = model_path
        self.weight_version = "default"
        self.weights: dict[str, torch.Tensor] = {}
        self.generate_calls = 0
        self.rids_served: list[str] = []
        self.inflight = 0
        self.abort = threading.Event()
        self.session_open = False
        self.log: list[str] = []  # control endpoints in call order
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, JSON body) received
        self.paused = False
        self.released: set[str] = set()
        self.groups: dict[str, object] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"

    def start(self) -> "FakeSGLang":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- endpoints (name -> handler(body) -> (status, json-able or str)) ------------------

    def generate(self, body: dict):
        with self.lock:
            self.generate_calls += 1
            call = self.generate_calls
            if self.fail_503 > 0:
                self.fail_503 -= 1
                return 503, {"error": {"message": "Service Unavailable"}}
        marker = self.behaviour["die_marker"]
        if call == self.behaviour["die_on_generate"] and not (marker and os.path.exists(marker)):
            if marker:
                open(marker, "w").close()
            return "die", None
        ids, rids = body["input_ids"], body["rid"]
        sp = body["sampling_params"]
        sps = sp if isinstance(sp, list) else [sp] * len(ids)
        assert isinstance(ids[0], list) and len(rids) == len(ids) == len(sps), body.keys()
        assert body.get("return_logprob") is True
        n = sps[0].get("n", 1)
        with self.lock:
            self.inflight += 1
            self.rids_served += rids
        try:
            # SGLang's batch with n > 1: [p0 x n, p1 x n, ...] (tokenizer_manager.py)
            reqs = [(prompt, params, f"{rid}-{k}" if n > 1 else rid, k)
                    for prompt, params, rid in zip(ids, sps, rids) for k in range(n)]
            return 200, self._decode(reqs)
        finally:
            with self.lock:
                self.inflight -= 1

    def _decode(self, reqs):
        """All requests of the batch advance one token per step, as in a real batch."""
        tokens = [[] for _ in reqs]
        finish = [None] * len(reqs)
        for t in range(max(params.get("max_new_tokens", 128) for _, params, _, _ in reqs)):
            if all(finish):
                break
            time.sleep(self.behaviour["token_delay_s"])
            for i, (prompt, params, _, k) in enumerate(reqs):
                if finish[i]:
                    continue
                if self.abort.is_set():
                    finish[i] = {"type": "abort", "message": "Abort in waiting queue",
                                 "status_code": None, "err_type": None}
                    continue
                tokens[i].append(fake_token(prompt, params.get("sampling_seed", k), t))
                if tokens[i][-1] in set(params.get("stop_token_ids") or []):
                    finish[i] = {"type": "stop", "matched": tokens[i][-1]}
                elif len(tokens[i]) == params.get("max_new_tokens", 128):
                    finish[i] = {"type": "length", "length": len(tokens[i])}
        return [{"text": "".join(chr(97 + x % 26) for x in toks), "output_ids": toks,
                 "meta_info": {"id": rid, "finish_reason": fin, "prompt_tokens": len(prompt),
                               "completion_tokens": len(toks), "cached_tokens": 0,
                               "weight_version": self.weight_version, "e2e_latency": 0.0,
                               "output_token_logprobs": [[fake_logprob(x), x, None]
                                                         for x in toks]}}
                for toks, fin, (prompt, _, rid, _) in zip(tokens, finish, reqs)]

    def abort_request(self, body):
        if body.get("abort_all") or body.get("rid"):
            self.abort.set()
        return 200, ""

    def flush_cache(self, body):
        self.log.append("flush_cache")
        if self.inflight:
            return 400, "Flush cache failed: running requests\n"
        return 200, "Cache flushed.\nPlease check backend logs for more details.\n"

    def pause_generation(self, body):
        assert body.get("mode", "abort") in ("abort", "retract", "in_place")
        self.log.append("pause_generation")
        self.paused = True
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body):
        self.log.append("continue_generation")
        self.paused = False
        self.abort.clear()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def begin_weight_update(self, body):
        self.log.append("begin_weight_update")
        if self.session_open:
            return 400, {"success": False, "message": "a weight-update session is already open"}
        self.session_open = True
        return 200, {"success": True, "message": "Success"}

    def end_weight_update(self, body):
        self.log.append("end_weight_update")
        ok, self.session_open = self.session_open, False
        return (200 if ok else 400), {"success": ok, "message": "Success" if ok else
                                      "no weight-update session is open"}

    def _loaded(self, tensors: dict, body: dict):
        self.weights.update(tensors)
        if body.get("weight_version") is not None:
            self.weight_version = body["weight_version"]
        return 200, {"success": True, "message": "Success"}

    def update_weights_from_tensor(self, body):
        self.log.append("update_weights_from_tensor")
        if not self.session_open:
            return 400, {"success": False, "message": "update_weights_from_tensor must run "
                         "between begin_weight_update() and end_weight_update()"}
        assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is False
        data = SafeUnpickler(io.BytesIO(base64.b64decode(body["serialized_named_tensors"][0]))
                             ).load()
        meta = data["metadata"]
        flat = data["flattened_tensor"]
        tensors = {m.name: flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape).clone()
                   for m in meta}
        return self._loaded(tensors, body)

    def init_weights_update_group(self, body):
        from megatron_sppo.rollout.sglang_weights import join_weight_update_group

        group = join_weight_update_group(body["master_address"], body["master_port"],
                                         body["world_size"], body["rank_offset"],
                                         body.get("group_name", "weight_update_group"),
                                         body.get("backend", "nccl"))
        self.groups[body.get("group_name", "weight_update_group")] = group
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_weights_from_distributed(self, body):
        self.log.append("update_weights_from_distributed")
        if not self.session_open:
            return 400, {"success": False, "message": "outside a weight-update session"}
        import torch

        assert body["load_format"] == "flattened_bucket"
        sizes = [torch.Size(s).numel() * getattr(torch, d).itemsize
                 for d, s in zip(body["dtypes"], body["shapes"])]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        torch.distributed.broadcast(flat, src=0, group=self.groups[body["group_name"]])
        return self._loaded(unflatten(flat, body["names"], body["dtypes"], body["shapes"]), body)

    def destroy_weights_update_group(self, body):
        import torch

        torch.distributed.destroy_process_group(self.groups.pop(body["group_name"]))
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def get_weights_by_name(self, body):
        return 200, self.weights[body["name"]].float().flatten()[:body.get("truncate_size", 100)
                                                                  ].tolist()

    def release_memory_occupation(self, body):
        if self.inflight:
            return 400, {"error": {"message": "release_memory_occupation should be called "
                                   "only when server is idle."}}
        self.released |= set(body.get("tags") or ["weights", "kv_cache", "cuda_graph"])
        return 200, None

    def resume_memory_occupation(self, body):
        self.released -= set(body.get("tags") or ["weights", "kv_cache", "cuda_graph"])
        return 200, None

    def _handler(self):
        fake = self

        def route(method: str, path: str, body: dict):
            fake.requests.append((method, path, body))
            path = path.strip("/")
            if path in ("health", "health_generate"):
                return (200, "") if fake.behaviour["healthy"] else (503, "")
            if path == "model_info":
                return 200, {"model_path": fake.model_path, "is_generation": True,
                             "weight_version": fake.weight_version}
            if path == "server_info":
                return 200, {"tp_size": fake.behaviour["tp_size"], "version": "0.5.23"}
            handler = getattr(fake, path, None)
            if handler is None or path.startswith("_"):
                return 404, {"detail": "Not Found"}
            return handler(body)

        def die():  # the process dies mid-request: no answer, port closed
            fake.httpd.socket.close()
            if os.environ.get("FAKE_SGLANG") is not None:
                os._exit(1)

        return make_handler(route, die)


def make_handler(route, die=None):
    """An HTTP/1.1 handler answering JSON (or text) from ``route(method, path, body)`` ->
    (status, content); a status of "die" drops the connection and calls ``die``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _reply(self, status, content):
            raw = (content if isinstance(content, str) else json.dumps(content)).encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain" if isinstance(content, str)
                             else "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _answer(self, body):
            status, content = route(self.command, self.path.split("?")[0], body)
            if status == "die":
                self.close_connection = True
                self.connection.close()
                die()
                return
            self._reply(status, content)

        def do_GET(self):
            self._answer({})

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            self._answer(json.loads(self.rfile.read(length) or b"{}"))

    return Handler


def main() -> None:
    if os.environ.get("FAKE_SGLANG") is None:
        from sglang.standin.server import main as standin

        standin(sys.argv[1:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--dp-size", type=int, default=1)
    args, _ = parser.parse_known_args()  # the launcher's other flags are SGLang's
    behaviour = json.loads(os.environ["FAKE_SGLANG"] or "{}")
    fake = FakeSGLang(args.host, args.port, tp_size=args.tp_size, model_path=args.model_path,
                      **behaviour)
    print(json.dumps({"argv": sys.argv[1:]}), flush=True)
    fake.httpd.serve_forever()


if __name__ == "__main__":
    main()
