"""VLLMEngine: one vLLM ``AsyncLLM`` in this process, driven token-in / token-out.

One engine per GPU group (``VLLMEngine.launch``); on the CPU build of vLLM one
engine per core set. Requests use ``FINAL_ONLY`` output so that ``n > 1``
children arrive together, and ask for the logprob of every sampled token.
"""
from __future__ import annotations

import asyncio
import gc
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineDeadError, EngineError
from ..task import GenerationConfig
from .base import Completion, HFTokenizerMixin

# Settings the CPU build needs on small machines (measured on 2-core CPU machines);
# defaults only: a value in os.environ or in ``env=`` wins.
CPU_ENV_DEFAULTS = {
    "TORCHDYNAMO_DISABLE": "1",                 # else the first request compiles C++ for ~20 s
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",      # one engine-core process instead of two
    "VLLM_CPU_KVCACHE_SPACE": "1",              # GiB; the default 0.9 of memory fails at startup
}

# Engine construction rewrites os.environ; one construction at a time, then restored.
_ENV_LOCK = threading.Lock()


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform
    return bool(current_platform.is_cpu())


class VLLMEngine(HFTokenizerMixin):
    """An ``InferenceModel`` backed by ``vllm.v1.engine.async_llm.AsyncLLM``.

    ``engine_args`` are ``AsyncEngineArgs`` fields; ``env`` holds environment
    variables the engine's processes see (the caller's ``os.environ`` is restored
    after construction). The engine starts in ``prepare()``.
    """

    def __init__(self, model: str | os.PathLike[str], *, env: dict[str, str] | None = None,
                 name: str = "vllm", **engine_args: Any) -> None:
        self.name = name
        self.model_version = 0
        self._engine_args = {"model": str(model), **engine_args}
        self._env = dict(env or {})
        self._llm: Any = None
        self._tokenizer = None
        self._dead = False
        self._shut = False
        self._start_lock = asyncio.Lock()
        self._update_lock = asyncio.Lock()

    @classmethod
    def launch(cls, model: str | os.PathLike[str], *, gpus: int | list[int] | None = None,
               tensor_parallel_size: int = 1, cpu_engines: int = 1,
               env: dict[str, str] | None = None, **engine_args: Any) -> list[VLLMEngine]:
        """One engine per group of ``tensor_parallel_size`` GPUs (not started yet).

        ``gpus``: how many GPUs, or which (indices into the visible devices); all
        visible ones when None. On the CPU build, ``cpu_engines`` engines split the
        cores this process may use.
        """
        env = dict(env or {})
        if _is_cpu_build():
            cores = sorted(os.sched_getaffinity(0))
            if cpu_engines < 1:
                raise ValueError(f"VLLMEngine.launch: cpu_engines must be >= 1, got {cpu_engines}")
            # Disjoint core sets when there are enough cores, else engines share them.
            groups = [cores[i::cpu_engines] or [cores[i % len(cores)]] for i in range(cpu_engines)]
            return [cls(model, name=f"vllm-cpu{i}", tensor_parallel_size=tensor_parallel_size,
                        env={"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, g)), **env},
                        **engine_args)
                    for i, g in enumerate(groups)]
        import torch
        if gpus is None:
            ids = list(range(torch.cuda.device_count()))
        elif isinstance(gpus, int):
            ids = list(range(gpus))
        else:
            ids = list(gpus)
        if not ids or len(ids) % tensor_parallel_size:
            raise ValueError(f"VLLMEngine.launch: {len(ids)} GPU(s) {ids} cannot be split into "
                             f"groups of tensor_parallel_size={tensor_parallel_size}")
        # Indices are relative to the caller's CUDA_VISIBLE_DEVICES, as torch sees them.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = visible.split(",") if visible else [str(i) for i in range(max(ids) + 1)]
        engines = []
        for k in range(0, len(ids), tensor_parallel_size):
            group = [physical[i] for i in ids[k:k + tensor_parallel_size]]
            engines.append(cls(model, name=f"vllm-gpu{','.join(group)}",
                               tensor_parallel_size=tensor_parallel_size,
                               env={"CUDA_VISIBLE_DEVICES": ",".join(group), **env},
                               **engine_args))
        return engines

    # -- lifecycle ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Start the engine (seconds) in a thread, so the event loop keeps running."""
        async with self._start_lock:
            if self._shut:
                raise EngineDeadError(f"{self.name}: prepare() after shutdown()")
            if self._llm is None:
                loop = asyncio.get_running_loop()
                self._llm, self._tokenizer = await loop.run_in_executor(None, self._build)

    def _build(self) -> tuple[Any, Any]:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args
        env = dict(self._env)
        if _is_cpu_build():
            env = {k: v for k, v in CPU_ENV_DEFAULTS.items() if k not in os.environ} | env
        with _ENV_LOCK:
            saved = dict(os.environ)
            try:
                os.environ.update(env)
                llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
            finally:
                os.environ.clear()
                os.environ.update(saved)
        tokenizer = AutoTokenizer.from_pretrained(
            args.get("tokenizer") or args["model"],
            trust_remote_code=args.get("trust_remote_code", False))
        return llm, tokenizer

    async def shutdown(self) -> None:
        """Stop the engine; its ``shutdown()`` blocks for seconds, so it runs in a thread."""
        if self._shut:
            return
        self._shut = True
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
            # AsyncLLM.__del__ shuts down again; let it run now rather than at interpreter
            # exit, when the modules it needs are gone and it prints a traceback.
            del llm
            gc.collect()

    @property
    def is_dead(self) -> bool:
        if self._dead or self._shut:
            return True
        return self._llm is not None and self._llm.errored

    @property
    def llm(self) -> Any:
        """The underlying ``AsyncLLM`` (for control calls this class does not wrap)."""
        if self._llm is None:
            raise EngineDeadError(f"{self.name}: engine is shut down" if self._shut
                                  else f"{self.name}: call prepare() first")
        return self._llm

    # -- generation --------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: GenerationConfig, *,
                       request_id: str) -> list[Completion]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMDeadError

        llm = self.llm
        if self.is_dead:
            raise EngineDeadError(f"{self.name}: engine is dead; request {request_id} refused")
        final = None
        try:
            async for out in llm.generate(TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
                                          self._sampling_params(params), request_id):
                final = out
        except VLLMDeadError as exc:
            self._dead = True
            raise EngineDeadError(f"{self.name}: engine died during request {request_id}") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if llm.errored:
                self._dead = True
                raise EngineDeadError(f"{self.name}: engine died during request "
                                      f"{request_id}: {exc!r}") from exc
            raise EngineError(f"{self.name}: request {request_id} failed: {exc!r}") from exc
        if final is None:
            raise EngineError(f"{self.name}: request {request_id} ended without output")
        return [_completion(c) for c in final.outputs]

    @staticmethod
    def _sampling_params(params: GenerationConfig) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        return SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k, max_tokens=params.max_tokens,
                              logprobs=max(params.logprobs, 0), seed=params.seed,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests; their ``generate`` calls return what was sampled so far."""
        if request_ids and self._llm is not None and not self.is_dead:
            await self._llm.abort(list(request_ids))

    async def update_weights(self, path: str | os.PathLike[str], *, mode: str = "wait") -> int:
        """Load new weights from a checkpoint folder; returns the new ``model_version``.

        Generation pauses (``mode`` is vLLM's: "wait" lets running requests finish,
        "keep" freezes them, "abort" aborts them), the workers reload in place, the
        prefix cache (stale KV) is dropped, and generation resumes.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{self.name}: checkpoint folder {path} does not exist")
        llm = self.llm
        async with self._update_lock:
            await llm.pause_generation(mode=mode)
            try:
                await llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                await llm.reset_prefix_cache()
                self.model_version += 1
                await llm.update_weight_version(str(self.model_version))
            finally:
                await llm.resume_generation()
        return self.model_version



def _completion(c: Any) -> Completion:
    tokens = np.asarray(c.token_ids, dtype=np.int32)
    logprobs = None
    if c.logprobs is not None:
        # One entry per sampled token, mapping token id -> Logprob; index by the sampled token
        # (top-k may be larger).
        logprobs = np.fromiter((d[t].logprob
                                for t, d in zip(c.token_ids, c.logprobs, strict=True)),
                               dtype=np.float32, count=len(c.token_ids))
    return Completion(token_ids=tokens, logprobs=logprobs, finish_reason=c.finish_reason or "abort",
                      text=c.text, cumulative_logprob=c.cumulative_logprob)
