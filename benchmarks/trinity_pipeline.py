"""Trinity-RFT 0.6.0's own ExperiencePipeline, its real operators and FILE buffer, in one process.

The baseline the pipeline benchmark compares against. Trinity's real code runs unchanged: the
``ExperiencePipeline`` class (``trinity/buffer/pipelines/experience_pipeline.py``), fed through
``process_serialized_chunks`` (one TRXP payload per task, decoded with
``Experience.deserialize_many``) as its coordinator feeds it at finalize; the operators its
``create_operators`` makes, ``GRPOGroupedAdvantage`` (epsilon 1e-6) then ``RewardSTDFilter``
(threshold 0); and the output its ``get_buffer_writer`` makes for a FILE trainer input buffer:
``JSONWriter`` -> ``FileStorage.write``, one JSON line per experience, flushed, not synced.
What differs from a Trinity run:

- ``ray`` is trinity_coordinator's in-process stand-in: the FILE storage, a Ray actor in Trinity
  (the trainer input buffer always has ``wrap_in_ray``), runs in this process, so the batch is
  not pickled to another process on its way to the file;
- ``prepare()`` is replaced by what it builds for this config (no auxiliary models): the
  operators and ``output.acquire()``. Trinity puts the algorithm's advantage operator after the
  configured ones (filter, then GRPO); here GRPO comes first, as on fastrollout's side, so both
  sides do the same work;
- ``save_input`` is off: by default Trinity first writes every input experience to SQLite.

So the figures are a LOWER BOUND on Trinity's cost. Modules load without Trinity's package
``__init__``s; every ``ray``/``trinity`` module loaded is removed from ``sys.modules`` afterwards
(kept here, and put back only while a pipeline is built), so nothing leaks into other imports.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator

from benchmarks.trinity_coordinator import (
    _Allocator,
    _module,
    _package,
    _ray_module,
    _scoped_modules,
    _trinity_root,
)

__all__ = ["open_trinity_pipeline", "trinity_pipeline_modules"]

GRPO = "trinity.algorithm.advantage_fn.grpo_advantage.GRPOGroupedAdvantage"
_MODULES: dict[str, types.ModuleType] = {}


@contextlib.contextmanager
def _loaded() -> Iterator[types.SimpleNamespace]:
    """Trinity's modules in ``sys.modules`` for the block: imported the first time (against
    the stand-ins), put back the next times."""
    with _scoped_modules():
        if _MODULES:
            sys.modules.update(_MODULES)
        else:
            root = _trinity_root()
            before = set(sys.modules)
            sys.modules.update(_ray_module())
            sys.modules.update({
                "trinity.buffer": _package("trinity.buffer", root / "buffer"),
                "trinity.buffer.pipelines": _package("trinity.buffer.pipelines",
                                                     root / "buffer" / "pipelines"),
                "trinity.algorithm": _package("trinity.algorithm", root / "algorithm"),
                "trinity.common.models.allocator": _module("trinity.common.models.allocator",
                                                           Allocator=_Allocator),
            })
            for name in ("trinity.buffer.pipelines.experience_pipeline",
                         "trinity.buffer.writer.file_writer", GRPO.rsplit(".", 1)[0],
                         "trinity.buffer.operators.filters.reward_filter"):
                importlib.import_module(name)
            _MODULES.update((name, module) for name, module in sys.modules.items()
                            if name not in before and name.split(".", 1)[0] in ("ray", "trinity"))
        yield types.SimpleNamespace(
            config=sys.modules["trinity.common.config"],
            experience=sys.modules["trinity.common.experience"],
            pipeline=sys.modules["trinity.buffer.pipelines.experience_pipeline"],
            operators=sys.modules["trinity.buffer.operators"])


def trinity_pipeline_modules() -> types.SimpleNamespace:
    """Trinity's config, experience, experience_pipeline and operators modules."""
    with _loaded() as trinity:
        return trinity


async def open_trinity_pipeline(path: str | os.PathLike[str]):
    """Trinity's ExperiencePipeline, ready to process: GRPO then the reward-std filter, output
    to the JSONL file ``path``. Close it with ``await pipeline.close()``."""
    with _loaded() as trinity:
        config = trinity.config.Config()
        config.data_processor.experience_pipeline.save_input = False
        config.buffer.trainer_input.experience_buffer = trinity.config.ExperienceBufferConfig(
            name="experience_buffer", storage_type="file", path=os.fspath(path))
        pipeline = trinity.pipeline.ExperiencePipeline(config)
        pipeline.operators = trinity.operators.create_operators(
            [trinity.config.OperatorConfig(name=GRPO),
             trinity.config.OperatorConfig(name="reward_std_filter")])
    await pipeline.output.acquire()
    for operator in pipeline.operators:
        await operator.prepare()
    return pipeline
