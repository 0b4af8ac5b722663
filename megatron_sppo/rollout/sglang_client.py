"""HTTP client for SGLang's native API (request/response shapes of SGLang 0.5.23).

Generation (``POST /generate``) goes out as large batch requests (``input_ids`` a list of
lists, one ``rid`` each, ``return_logprob``) spread over the replicas by worker tasks that
pull from one queue, so a faster replica takes more work and a failed request is simply
queued again: results are stored only from complete responses, keyed by (prompt, sample),
so nothing is lost or duplicated. A replica that stops answering is health-checked, then
restarted (launched servers) or dropped (attached ones); when none is left the call fails
with one line naming the servers. Stragglers are aborted (``/abort_request``) at a deadline
and come back as ``finish_reason == "abort"``.

n samples per prompt are sent as duplicated requests (one rid per sample) by default,
not as ``sampling_params.n``. Read from SGLang 0.5.23's tokenizer_manager.py
(``_handle_batch_request``): with n > 1 it first sends one prefix-caching request per
prompt and awaits each in turn, gives every sample a fresh uuid rid (our rids cannot abort
them), and warns that batches > 128 with n > 1 are "not well optimized". Duplicates get their
own seeds (:func:`~megatron_sppo.rollout.engine.sample_seed`) and still share the prompt's
KV through the radix cache.

Seeds: SGLang uses ``sampling_seed`` only when the server runs with
``--enable-deterministic-inference`` (sampling/sampling_batch_info.py); there every row
without a seed draws with seed 42, so the n samples of one prompt sent with SGLang's n come
out identical, seeded or not. ``seeded`` says whether the servers honour seeds:
``n_mode="parallel"`` (SGLang's n, outputs grouped by prompt: output j belongs to prompt
j // n) is refused on such servers and sent without seeds on the others, where rollouts are
not reproducible anyway. No SGLang was at hand to time both modes here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests
from requests.adapters import HTTPAdapter

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import EngineError, Sample, SamplingParams, sample_seed
from megatron_sppo.rollout.sglang_launcher import SGLangServer

log = logging.getLogger(__name__)

# Overloaded / restarting / behind a proxy: worth another try. SGLang answers a bad request
# with 400 and a server-side failure of a control call with 400 + {"success": false}.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


class ServerUnavailable(Exception):
    """A server did not answer after the retries (connection refused/reset, timeout, 5xx)."""


class SGLangHTTP:
    """Blocking calls to one server's endpoints, retried with exponential backoff."""

    def __init__(self, server: SGLangServer, *, request_timeout_s: float = 3600.0,
                 connect_timeout_s: float = 10.0, max_retries: int = 3, backoff_s: float = 0.5,
                 pool_size: int = 32):
        self.server = server
        self.url = server.url
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.dead = False
        self.recovering = False
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=pool_size))

    def request(self, method: str, path: str, payload: Any = None,
                timeout_s: float | None = None) -> requests.Response:
        timeout = (self.connect_timeout_s, timeout_s or self.request_timeout_s)
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            try:
                resp = self.session.request(method, self.url + path, json=payload,
                                            timeout=timeout)
            except requests.RequestException as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in TRANSIENT_STATUS:
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise EngineError(f"SGLang {self.url}{path} refused the request "
                                  f"(HTTP {resp.status_code}): {resp.text[:300]}")
            return resp
        raise ServerUnavailable(f"{self.url}{path}: no answer after {self.max_retries + 1} "
                                f"tries ({error})")

    def post(self, path: str, payload: Any = None, timeout_s: float | None = None) -> Any:
        resp = self.request("POST", path, payload if payload is not None else {}, timeout_s)
        return resp.json() if resp.content and "json" in resp.headers.get("content-type", "") \
            else resp.text

    def call(self, path: str, payload: Any = None, timeout_s: float | None = None) -> dict:
        """A control endpoint answering {"success", "message"}: a failure raises."""
        out = self.post(path, payload, timeout_s)
        if not isinstance(out, dict) or not out.get("success", False):
            raise EngineError(f"SGLang {self.url}{path} failed: {out}")
        return out

    # ---- endpoints -------------------------------------------------------------------------

    def healthy(self) -> bool:
        return self.server.healthy()

    def model_info(self) -> dict:
        return self.request("GET", "/model_info", timeout_s=30).json()

    def abort_all(self) -> None:
        self.request("POST", "/abort_request", {"abort_all": True}, timeout_s=30)

    def pause_generation(self, mode: str = "abort") -> None:
        self.post("/pause_generation", {"mode": mode}, timeout_s=300)

    def continue_generation(self) -> None:
        self.post("/continue_generation", {}, timeout_s=300)

    def flush_cache(self, attempts: int = 20, wait_s: float = 0.5) -> None:
        """SGLang refuses (400) while requests are still running: wait for them to drain."""
        for _ in range(attempts):
            try:
                resp = self.session.post(self.url + "/flush_cache",
                                         timeout=(self.connect_timeout_s, 60))
            except requests.RequestException as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    return
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            time.sleep(wait_s)
        raise EngineError(f"SGLang {self.url}/flush_cache kept failing ({error}): requests "
                          "are still running on it, or it is down")

    def release_memory(self, tags: list[str] | None = None) -> None:
        self.post("/release_memory_occupation", {"tags": tags}, timeout_s=600)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.post("/resume_memory_occupation", {"tags": tags}, timeout_s=600)


def on_each(endpoints: list[SGLangHTTP], fn: Callable[[SGLangHTTP], Any]) -> list[Any]:
    """``fn`` on every server at once (threads); the first failure is raised."""
    with concurrent.futures.ThreadPoolExecutor(max(1, len(endpoints))) as pool:
        return [f.result() for f in [pool.submit(fn, e) for e in endpoints]]


def sglang_sampling_params(params: SamplingParams) -> dict:
    """SamplingParams -> SGLang's ``sampling_params`` dict (without n and seed)."""
    out = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
           "top_p": params.top_p, "top_k": params.top_k if params.top_k > 0 else -1}
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    return out


_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def parse_output(out: dict) -> Sample:
    """One element of a /generate response -> Sample (output ids and logprobs checked)."""
    meta = out["meta_info"]
    ids = list(out["output_ids"])
    entries = meta.get("output_token_logprobs") or []
    if len(entries) != len(ids) or any(int(e[1]) != t for e, t in zip(entries, ids)):
        raise EngineError(f"SGLang request {meta.get('id')}: output_token_logprobs do not match "
                          "output_ids (was return_logprob sent?)")
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in _FINISH:
        raise EngineError(f"SGLang request {meta.get('id')}: unknown finish_reason {reason!r}")
    return Sample(token_ids=ids, logprobs=[float(e[0]) for e in entries],
                  finish_reason=_FINISH[kind], text=out.get("text") or "")


@dataclass
class _Chunk:
    """One /generate request: (prompt, sample) slots and the payload that fills them."""

    slots: list[tuple[int, int]]
    payload: dict


class SGLangClient:
    """Generation and control calls over a set of SGLang servers (one per replica)."""

    def __init__(self, servers: list[SGLangServer], *, batch_size: int = 256,
                 inflight_per_server: int = 8, n_mode: str = "duplicate",
                 request_timeout_s: float = 3600.0, max_retries: int = 3,
                 backoff_s: float = 0.5, restart_timeout_s: float = 600.0,
                 abort_after_s: float | None = None, seeded: bool = True):
        if not servers:
            raise UserError("no SGLang servers: launch some or give rollout.sglang.addresses")
        if n_mode not in ("duplicate", "parallel"):
            raise UserError(f"n_mode={n_mode!r}: use 'duplicate' or 'parallel'")
        self.endpoints = [SGLangHTTP(s, request_timeout_s=request_timeout_s,
                                     max_retries=max_retries, backoff_s=backoff_s,
                                     pool_size=inflight_per_server + 4) for s in servers]
        self.batch_size = batch_size
        self.inflight = inflight_per_server
        self.n_mode = n_mode
        self.seeded = seeded
        self.restart_timeout_s = restart_timeout_s
        self.abort_after_s = abort_after_s
        self._calls = itertools.count()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(servers) * (inflight_per_server + 1) + 2,
            thread_name_prefix="sglang")

    @property
    def live(self) -> list[SGLangHTTP]:
        return [e for e in self.endpoints if not e.dead]

    # ---- generation ------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        return asyncio.run(self.agenerate(prompts, params))

    def _chunks(self, prompts: list[list[int]], params: SamplingParams) -> list[_Chunk]:
        """Batch requests of at most ``batch_size`` samples: one request per sample
        (duplicate mode) or per prompt with SGLang's n (parallel mode)."""
        call, n = next(self._calls), params.n
        parallel = self.n_mode == "parallel" and n > 1
        if parallel and self.seeded:
            raise UserError("n_mode='parallel' on servers with --enable-deterministic-inference "
                            "draws the n samples of a prompt alike (they share a seed): use "
                            "n_mode='duplicate'")
        seed = params.seed if not parallel else None
        sampling = {**sglang_sampling_params(params), **({"n": n} if parallel else {})}
        requests = ([(p, None) for p in range(len(prompts))] if parallel
                    else [(p, s) for p in range(len(prompts)) for s in range(n)])
        per = max(1, self.batch_size // n) if parallel else self.batch_size
        chunks = []
        for start in range(0, len(requests), per):
            part = requests[start:start + per]
            sp = sampling if seed is None else [
                {**sampling, "sampling_seed": sample_seed(seed, p, s)} for p, s in part]
            slots = [(p, k) for p, s in part for k in (range(n) if s is None else (s,))]
            chunks.append(_Chunk(slots, {
                "input_ids": [prompts[p] for p, _ in part], "sampling_params": sp,
                "rid": [f"sppo-{call}-{p}" + ("" if s is None else f"-{s}") for p, s in part],
                "return_logprob": True, "logprob_start_len": -1}))
        return chunks

    async def agenerate(self, prompts: list[list[int]],
                        params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples per prompt, ``result[prompt][sample]``, over all replicas."""
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        queue = list(reversed(self._chunks(prompts, params)))
        pending = len(queue)
        wake = asyncio.Condition()
        results: dict[tuple[int, int], Sample] = {}
        errors: list[str] = []
        state = {"aborting": False, "inflight": 0}

        async def worker(endpoint: SGLangHTTP):
            nonlocal pending
            while pending and not endpoint.dead and not state["aborting"]:
                if not queue:
                    async with wake:
                        await wake.wait()
                    continue
                chunk = queue.pop()
                state["inflight"] += 1
                try:
                    outputs = await loop.run_in_executor(
                        self._pool, endpoint.post, "/generate", chunk.payload)
                except ServerUnavailable as e:
                    queue.append(chunk)
                    errors.append(str(e))
                    async with wake:
                        wake.notify_all()
                    await self._recover(endpoint, loop)
                    continue
                finally:
                    state["inflight"] -= 1
                if not isinstance(outputs, list) or len(outputs) != len(chunk.slots):
                    raise EngineError(f"SGLang {endpoint.url}/generate answered "
                                      f"{len(outputs) if isinstance(outputs, list) else outputs!r}"
                                      f" outputs for {len(chunk.slots)} requests")
                for slot, out in zip(chunk.slots, outputs):
                    results[slot] = parse_output(out)
                pending -= 1
                if not pending:
                    async with wake:
                        wake.notify_all()

        async def abort_at_deadline():
            await asyncio.sleep(self.abort_after_s)
            state["aborting"] = True
            async with wake:
                wake.notify_all()
            while state["inflight"]:  # a request sent just before the abort escapes it
                await asyncio.gather(*(loop.run_in_executor(self._pool, e.abort_all)
                                       for e in self.live), return_exceptions=True)
                await asyncio.sleep(1.0)

        workers = [asyncio.ensure_future(worker(e))
                   for e in self.live for _ in range(self.inflight)]
        timer = asyncio.ensure_future(abort_at_deadline()) if self.abort_after_s else None
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            if timer is not None:
                timer.cancel()
        if pending and not state["aborting"]:
            urls = ", ".join(e.url for e in self.endpoints)
            raise EngineError(f"all SGLang servers failed ({urls}); {pending} of the call's "
                              f"requests unanswered; last error: "
                              f"{errors[-1] if errors else 'none'}")
        return [[results.get((p, s)) or Sample(token_ids=[], logprobs=[], finish_reason="abort")
                 for s in range(params.n)] for p in range(len(prompts))]

    async def _recover(self, endpoint: SGLangHTTP, loop) -> None:
        """After a failed request: healthy -> keep; launched -> restart; else drop."""
        if endpoint.recovering:  # another worker of this server is on it
            while endpoint.recovering:
                await asyncio.sleep(0.1)
            return
        endpoint.recovering = True
        try:
            if await loop.run_in_executor(self._pool, endpoint.healthy):
                return
            if endpoint.server.launched:
                log.warning("SGLang server %s is not healthy: restarting it", endpoint.url)
                try:
                    await loop.run_in_executor(self._pool, endpoint.server.restart,
                                               self.restart_timeout_s)
                    return
                except (EngineError, UserError) as e:
                    log.error("restarting %s failed: %s", endpoint.url, e)
            log.error("SGLang server %s is dead: its requests go to the other servers",
                      endpoint.url)
            endpoint.dead = True
        finally:
            endpoint.recovering = False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
