"""Built-in workflows and rewards, registered by name for configs.

``get("math")`` returns a workflow class (``names()`` lists them), ``get("pkg.mod.Class")``
imports one that is not registered; ``@register("name")`` adds one. Environments of the
multi-turn workflow have a registry of their own (``get_env`` / ``register_env``).

Built in: ``"math"`` / ``"math_sync"`` (``MathWorkflow`` / ``MathWorkflowSync``: chat
template, answer extraction, ``math_reward``), ``"multi_turn_env"``
(``MultiTurnEnvWorkflow``) and the env ``"guess_number"`` (``GuessNumberEnv``).

The math reward needs math-verify (``pip install 'fastrollout[math]'``), imported only by
its worker processes: importing this package does not need it, and the reward raises an
ImportError naming the extra when it is missing.
"""
from __future__ import annotations

from .answer import extract_answer, last_boxed, reference_answer
from .env import ENVS, Env, GuessNumberEnv
from .math_workflow import MathWorkflow, MathWorkflowSync
from .multi_turn import ChatTemplateError, MultiTurnEnvWorkflow
from .registry import WORKFLOWS, Registry
from .rewards import math_reward, math_reward_async
from .verifier import MathVerifier, VerifierError, default_verifier, set_default_verifier

register = WORKFLOWS.register
get = WORKFLOWS.get
names = WORKFLOWS.names
register_env = ENVS.register
get_env = ENVS.get

__all__ = [
    "ChatTemplateError", "Env", "GuessNumberEnv", "MathVerifier", "MathWorkflow",
    "MathWorkflowSync", "MultiTurnEnvWorkflow", "Registry", "VerifierError",
    "default_verifier", "extract_answer", "get", "get_env", "last_boxed", "math_reward",
    "math_reward_async", "names", "reference_answer", "register", "register_env",
    "set_default_verifier",
]
