"""One TP rank of the stand-in: SGLang 0.5.23's scheduler process (managers/scheduler.py).

Rank r runs on GPU ``base_gpu_id + r`` (``torch.cuda.set_device``), joins the TP group (a
"cpu:gloo,cuda:nccl" default group, so its device collectives follow NCCL's rules under the
emulated accelerator, plus a gloo group for host objects, as SGLang's tp_group has a device and
a cpu group), loads a transformers model of the served checkpoint and sizes its KV pool
(:mod:`.memory`). Rank 0 receives requests and control calls from the HTTP process and
broadcasts them to the other ranks each iteration (SGLang's ``broadcast_pyobj`` of
``recv_reqs``), so every rank handles the same messages in the same order; control results are
gathered to rank 0, which answers.

Generation: continuous batching in decode steps. Every rank holds the whole model but
contributes only its slice of the vocabulary to the logits (gathered over the device group, as
SGLang's vocab-parallel head), so a rank with wrong weights corrupts the output as it would on a
GPU. Each request keeps its own KV cache; it is admitted when its prompt plus its token budget
fit in the pool. Finish checks follow ``Req.update_finish_state`` (stop string, then stop
token/EOS, then length); the sampler is :mod:`.sampler`.

Whatever SGLang's scheduler does not catch kills the process and with it the server (releasing
memory while requests run, a payload entry missing for this rank, a payload the unpickler
refuses, generating from released memory); SGLang's own error replies (updates outside a
weight-update session, a failed group join or receive, flush refused) are answered.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from sglang.standin import memory, sampler, weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Req:
    rid: str
    input_ids: list[int]
    params: sampler.Params
    spec: dict
    max_new_tokens: int
    start: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cache: object = None  # transformers cache on the device; None: (re)prefill
    finish: dict | None = None


class Scheduler:
    def __init__(self, rank: int, args: dict, conn, dist_port: int):
        from megatron_sppo.runtime import emulated

        # megatron-core never runs here: spare each rank its import (the emulator patches it
        # when it is importable)
        sys.modules.setdefault("megatron.core.tensor_parallel", None)
        emulated.enable()
        started = time.monotonic()
        self.rank, self.args, self.conn = rank, args, conn
        self.tp = args["tp_size"]
        self.gpu_id = args["base_gpu_id"] + rank * args["gpu_id_step"]
        torch.cuda.set_device(self.gpu_id)
        self.device = torch.device("cuda", self.gpu_id)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"tcp://127.0.0.1:{dist_port}", rank=rank,
                                world_size=self.tp, timeout=timedelta(days=7))
        self.cpu_group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        pre = memory.free_gib(self.gpu_id, self.cpu_group)
        self.model, self.tokenizer, self.eos_ids = self._load()
        config = self.model.config
        self.vocab = config.vocab_size
        self.shard = -(-self.vocab // self.tp)
        cell = memory.cell_size(config, self.tp, next(self.model.parameters()).dtype)
        self.max_total_num_tokens = memory.max_total_num_tokens(
            pre, memory.free_gib(self.gpu_id, self.cpu_group), args["mem_fraction_static"], cell)
        self.context_len = config.max_position_embeddings
        self.max_req_input_len = min(self.context_len - 1, self.max_total_num_tokens - 1)
        self.memory = memory.MemorySaver(self.model, self.device,
                                         self.max_total_num_tokens * cell,
                                         enabled=args["enable_memory_saver"],
                                         cpu_backup=args["enable_weights_cpu_backup"])
        self.deterministic = args["enable_deterministic_inference"]
        self.rng = torch.Generator().manual_seed(args["random_seed"])
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.finished: list[Req] = []
        self.reserved = 0
        self.paused = False
        self.session = False
        self.weight_version = "default"
        self.groups: dict[str, object] = {}
        if rank == 0:
            print(f"max_total_num_tokens={self.max_total_num_tokens}, "
                  f"context_len={self.context_len}, available_gpu_mem="
                  f"{memory.free_gib(self.gpu_id):.4f} GB (ready in "
                  f"{time.monotonic() - started:.1f} s)", flush=True)

    def _load(self):
        import transformers

        path, dtype = self.args["model_path"], self.args["dtype"]
        config = transformers.AutoConfig.from_pretrained(path)
        dtype = DTYPES.get(dtype) or getattr(config, "dtype", None) or torch.float32
        # from_config + the safetensors files through the loader pushed weights use, as
        # SGLang's model loader does (--load-format dummy leaves the weights unset)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if self.args["load_format"] != "dummy":
            weights.load_checkpoint(model, path)
        model = model.to(self.device).eval().requires_grad_(False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(
            config.eos_token_id or ())
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.eos_token_id is not None:
            extra = generation.eos_token_id
            eos |= {extra} if isinstance(extra, int) else set(extra)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return model, tokenizer, eos

    # ---- the event loop ---------------------------------------------------------------------

    def info(self) -> dict:
        return {"max_total_num_tokens": self.max_total_num_tokens,
                "max_req_input_len": self.max_req_input_len, "context_len": self.context_len,
                "vocab_size": self.vocab}

    def loop(self) -> None:
        self.conn.send(("ready", self.rank, self.info()))
        while True:
            for message in self._receive():
                self._handle(message)
            if self._busy():
                self._step()
            if self.rank == 0:
                for req in self.finished:
                    self.conn.send(("output", req.rid, self._output(req)))
            self.finished = []

    def _busy(self) -> bool:
        """Decoding to do: paused (in place or retracted), nothing moves."""
        return not self.paused and bool(self.running or self.waiting)

    def _receive(self) -> list:
        messages = None
        if self.rank == 0:
            messages = [] if self._busy() else [self.conn.recv()]
            while self.conn.poll():
                messages.append(self.conn.recv())
        if self.tp > 1:
            box = [messages]
            dist.broadcast_object_list(box, src=0, group=self.cpu_group)
            messages = box[0]
        return messages

    def _handle(self, message: dict) -> None:
        kind = message["kind"]
        if kind == "generate":
            for spec in message["reqs"]:
                self._enqueue(spec)
            return
        if kind == "abort":
            self._abort(message.get("rid"), message.get("abort_all", False))
            return
        result = getattr(self, f"_op_{kind}")(message.get("body") or {})
        success, text, payload = result if isinstance(result, tuple) else (True, "Success", result)
        everyone = [None] * self.tp if self.rank == 0 else None
        if self.tp > 1:
            dist.gather_object((success, text), everyone, dst=0, group=self.cpu_group)
        else:
            everyone = [(success, text)]
        if self.rank == 0:
            failed = [(r, t) for r, (ok, t) in enumerate(everyone) if not ok]
            text = failed[0][1] if failed else text
            self.conn.send(("reply", message["id"], not failed, text, payload))

    # ---- requests ------------------------------------------------------------------------------

    def _enqueue(self, spec: dict) -> None:
        sp = spec["sampling_params"]
        given = {k: sp[k] for k in ("temperature", "top_p", "top_k", "min_p", "sampling_seed")
                 if sp.get(k) is not None}  # None means the default, as in SGLang
        params = sampler.Params(**given)
        n_input = len(spec["input_ids"])
        budget = sp.get("max_new_tokens")
        budget = min(128 if budget is None else budget,
                     min(self.context_len, self.max_total_num_tokens) - n_input - 1)
        req = Req(spec["rid"], list(spec["input_ids"]), params, sp, budget)
        if n_input >= self.max_req_input_len:
            self._finish(req, {"type": "abort", "message": (
                f"Input length ({n_input} tokens) exceeds the maximum allowed length "
                f"({self.max_req_input_len} tokens). Use a shorter input or enable "
                "--allow-auto-truncate."), "status_code": 400, "err_type": "BadRequestError"})
        elif budget <= 0:
            self._finish(req, {"type": "length", "length": 0})
        else:
            self.waiting.append(req)

    def _abort(self, rid: str | None, everything: bool) -> None:
        for queue, message in ((self.waiting, "Abort in waiting queue"),
                               (self.running, "Aborted")):
            for req in [r for r in queue if everything or r.rid == rid]:
                queue.remove(req)
                self._finish(req, {"type": "abort", "message": message, "status_code": None,
                                   "err_type": None})

    def _finish(self, req: Req, reason: dict) -> None:
        if req in self.running:
            self.running.remove(req)
            self.reserved -= len(req.input_ids) + req.max_new_tokens
        req.finish, req.cache = reason, None
        self.finished.append(req)

    def _admit(self) -> None:
        while self.waiting and not self.paused:
            req = self.waiting[0]
            need = len(req.input_ids) + req.max_new_tokens
            if self.reserved + need > self.max_total_num_tokens:
                return
            self.reserved += need
            self.running.append(self.waiting.pop(0))

    def _step(self) -> None:
        self._admit()
        if not self.running:
            return
        for tag in ("kv_cache", "weights"):
            if self.memory.released(tag):
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered "
                                   f"[stand-in: a forward pass while '{tag}' is released]")
        rows = [self._forward(req) for req in self.running]
        local = torch.stack(rows)
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local)
        logits = torch.cat(parts, -1)[:, :self.vocab].cpu()
        positions = [len(r.input_ids) + len(r.output_ids) - 1 for r in self.running]
        tokens, logprobs = sampler.sample(logits, [r.params for r in self.running], positions,
                                          deterministic=self.deterministic, generator=self.rng)
        for req, token, logprob in zip(list(self.running), tokens, logprobs):
            req.output_ids.append(token)
            req.logprobs.append(logprob)
            reason = self._finished(req)
            if reason is not None:
                self._finish(req, reason)

    def _forward(self, req: Req) -> torch.Tensor:
        """This rank's vocabulary slice of the next-token logits (fp32, padded with -inf)."""
        from transformers import DynamicCache

        if req.cache is None:
            req.cache = DynamicCache(config=self.model.config)
            ids = req.input_ids + req.output_ids
        else:
            ids = req.output_ids[-1:]
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device),
                             past_key_values=req.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()[self.rank * self.shard:(self.rank + 1) * self.shard]
        pad = self.shard - logits.shape[0]
        return torch.cat([logits, logits.new_full((pad,), float("-inf"))]) if pad else logits

    def _finished(self, req: Req) -> dict | None:
        sp, out = req.spec, req.output_ids
        stops = [s for s in ([sp["stop"]] if isinstance(sp.get("stop"), str)
                             else sp.get("stop") or []) if s]
        if stops:
            width = 1 + max(len(self.tokenizer.encode(s, add_special_tokens=False))
                            for s in stops)
            tail = self.tokenizer.decode(out[-width:])
            hit = next((s for s in stops if s in tail), None)
            if hit is not None:
                return {"type": "stop", "matched": hit}
        stop_ids = set(sp.get("stop_token_ids") or ()) | self.eos_ids
        if not sp.get("ignore_eos") and out[-1] in stop_ids:
            return {"type": "stop", "matched": out[-1]}
        if len(out) >= req.max_new_tokens:
            return {"type": "length", "length": req.max_new_tokens}
        return None

    def _output(self, req: Req) -> dict:
        sp = req.spec
        text = self.tokenizer.decode(req.output_ids,
                                     skip_special_tokens=sp.get("skip_special_tokens", True))
        matched = req.finish.get("matched")
        if isinstance(matched, str) and not sp.get("no_stop_trim") and matched in text:
            text = text[:text.index(matched)]
        return {"text": text, "output_ids": req.output_ids, "meta_info": {
            "id": req.rid, "finish_reason": req.finish, "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids), "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": time.monotonic() - req.start,
            "output_token_logprobs": [[lp, t, None] for lp, t in
                                      zip(req.logprobs, req.output_ids)]}}

    # ---- control calls (one per endpoint; each returns (success, message, payload)) ----------

    def _idle(self) -> bool:
        return not self.running and (self.paused or not self.waiting)

    def _op_pause(self, body: dict):
        self.paused = True
        if body.get("mode") == "retract":  # running requests wait; their KV is recomputed
            for req in reversed(self.running):
                req.cache = None
                self.waiting.insert(0, req)
            self.running, self.reserved = [], 0

    def _op_continue(self, body: dict):
        self.paused = False

    def _op_flush_cache(self, body: dict):
        if not self._idle():
            return False, "Flush cache failed: there are running or queued requests.\n", None
        for req in self.waiting:
            req.cache = None
        return True, "Cache flushed.", None

    def _op_release(self, body: dict):
        assert self._idle(), "release_memory_occupation should be called only when server is idle."
        tags = body.get("tags") or list(memory.TAGS)
        if "kv_cache" in tags:
            self._op_flush_cache({})
        self.memory.release(tags)
        dist.barrier(group=self.cpu_group)

    def _op_resume(self, body: dict):
        self.memory.resume(body.get("tags") or list(memory.TAGS))
        dist.barrier(group=self.cpu_group)

    def _op_begin(self, body: dict):
        if self.session:
            return False, ("a weight-update session is already open; call "
                           "end_weight_update() first"), None
        self.session = True

    def _op_end(self, body: dict):
        if not self.session:
            return False, ("no weight-update session is open; call begin_weight_update() "
                           "first"), None
        self.session = False

    def _loaded(self, body: dict, message: str):
        if body.get("weight_version") is not None:
            self.weight_version = body["weight_version"]
        if body.get("flush_cache", True) and not self._op_flush_cache({})[0]:
            return False, ("Weights were updated, but the cache was not flushed because "
                           "requests are still running or queued. Retract or finish them, then "
                           "call /flush_cache."), None
        return True, message, None

    def _op_update_tensor(self, body: dict):
        if not self.session:
            return False, ("update_weights_from_tensor must run between begin_weight_update() "
                           "and end_weight_update()"), None
        data = weights.deserialize_own_rank(body["serialized_named_tensors"], self.rank)
        fmt = body.get("load_format")
        if fmt == "flattened_bucket":
            named = weights.reconstruct(data["flattened_tensor"], data["metadata"])
        elif fmt in (None, "direct"):
            named = data
        else:
            raise NotImplementedError(f"Unknown load_format={fmt}")
        weights.load_weights(self.model, named, direct=fmt == "direct")
        result = self._loaded(body, "Success")
        dist.barrier(group=self.cpu_group)
        return result

    def _op_init_group(self, body: dict):
        name = body.get("group_name", "weight_update_group")
        try:
            self.groups[name] = weights.init_custom_process_group(
                body.get("backend", "nccl"), body["master_address"], body["master_port"],
                body["world_size"], body["rank_offset"] + self.rank, name)
        except Exception as e:  # noqa: BLE001  (weight_updater.py answers failures)
            return False, f"Failed to initialize custom process group: {e}.", None
        return True, "Succeeded to initialize custom process group.", None

    def _op_update_distributed(self, body: dict):
        if not self.session:
            return False, ("update_weights_from_distributed must run between "
                           "begin_weight_update() and end_weight_update()"), None
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return False, (f"Failed to receive weights: Group {name} not in "
                           f"{list(self.groups)}. Please call `init_weights_update_group` "
                           "first."), None
        try:
            named = weights.receive_broadcast(self.groups[name], body["names"], body["dtypes"],
                                              body["shapes"], self.device)
        except Exception as e:  # noqa: BLE001
            return False, f"Failed to receive weights: {e}", None
        weights.load_weights(self.model, named)
        return self._loaded(body, "Succeeded to update parameter online.")

    def _op_destroy_group(self, body: dict):
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return False, "The group to be destroyed does not exist.", None
        dist.destroy_process_group(group)
        return True, "Succeeded to destroy custom process group.", None

    def _op_get_weights(self, body: dict):
        param = dict(self.model.named_parameters())[body["name"]]
        return param.detach().float().cpu().flatten()[:body.get("truncate_size", 100)].tolist()

    def _op_weight_version(self, body: dict):
        self.weight_version = body["new_version"]


def run(rank: int, args: dict, conn, dist_port: int) -> None:
    """Process target: any exception is fatal for the server, as in SGLang."""
    try:
        Scheduler(rank, args, conn, dist_port).loop()
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        message = f"Scheduler hit an exception (TP rank {rank}): {type(e).__name__}: {e}"
        print(message, file=sys.stderr, flush=True)
        try:
            conn.send(("fatal", rank, message))
        finally:
            os._exit(1)
