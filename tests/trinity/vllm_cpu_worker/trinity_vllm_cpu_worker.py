"""Let Trinity-RFT's vLLM worker run on vLLM's CPU build.

Trinity's vLLM model names its worker class outright
(``worker_cls="trinity.common.models.vllm_worker.TrinityGPUWorker"``), and that class
derives from vLLM's GPU worker, which refuses any device but CUDA. On the CPU platform this
general plugin re-bases the class onto vLLM's CPU worker (itself a subclass of the GPU
worker), the way vLLM itself injects worker extensions, so Trinity's own additions
(``apply_patches``, the checkpoint weight-transfer registration in ``load_model``) run
unchanged. vLLM loads general plugins in every engine and worker process, before it resolves
the worker class; ``VLLM_PLUGINS=trinity_cpu_worker`` selects this one alone.
"""
from __future__ import annotations


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from trinity.common.models.vllm_worker import TrinityGPUWorker
    from vllm.v1.worker.cpu_worker import CPUWorker

    if CPUWorker not in TrinityGPUWorker.__mro__:
        TrinityGPUWorker.__bases__ = (CPUWorker,)
