"""The math reward: accuracy from math-verify plus a format score for a boxed answer.

``reward = accuracy + format_score``: accuracy is 1.0 when the response's final answer
(``answer.extract_answer``) is equivalent to the reference answer, else 0.0; the format
score is ``boxed_score`` (default +0.1) when that answer was boxed and ``unboxed_score``
(default -0.1) when it came from the fallback or there was none.

Only answers that are not already textually equal to the reference go to math-verify (in
worker processes, ``verifier.MathVerifier``); a response without an answer, or with one
longer than ``MAX_ANSWER_CHARS``, is wrong without asking.
"""
from __future__ import annotations

from typing import Any

from .answer import extract_answer, reference_answer, same_answer
from .verifier import MathVerifier, default_verifier, require_math_verify

# No reference answer is this long; a longer "answer" is a runaway box, not worth a check.
MAX_ANSWER_CHARS = 1000
# The default format scores of an answer in a box and of one found otherwise (or none).
BOXED_SCORE = 0.1
UNBOXED_SCORE = -0.1


def math_reward(response: str, truth: Any, *, boxed_score: float = BOXED_SCORE,
                unboxed_score: float = UNBOXED_SCORE, fallback: bool = True,
                timeout: float | None = None,
                verifier: MathVerifier | None = None) -> tuple[float, dict[str, float]]:
    """``(reward, {"accuracy": ..., "format_score": ...})`` of ``response`` against the
    reference answer ``truth`` (a bare answer, a text with a ``\\boxed{}`` answer, or a
    GSM8K solution ending in ``#### answer``; numbers are accepted). Blocks the calling
    thread while math-verify runs: on an event loop use ``math_reward_async``."""
    boxed, verdict = _prepare(response, truth, fallback)
    if not isinstance(verdict, bool):
        verdict = (verifier or default_verifier()).verify(*verdict, timeout=timeout)
    return _score(verdict, boxed, boxed_score, unboxed_score)


async def math_reward_async(response: str, truth: Any, *, boxed_score: float = BOXED_SCORE,
                            unboxed_score: float = UNBOXED_SCORE, fallback: bool = True,
                            timeout: float | None = None,
                            verifier: MathVerifier | None = None
                            ) -> tuple[float, dict[str, float]]:
    """``math_reward`` for the event loop: math-verify's wait happens off the loop."""
    boxed, verdict = _prepare(response, truth, fallback)
    if not isinstance(verdict, bool):
        verdict = await (verifier or default_verifier()).verify_async(*verdict, timeout=timeout)
    return _score(verdict, boxed, boxed_score, unboxed_score)


def _prepare(response: str, truth: Any, fallback: bool) -> tuple[bool, bool | tuple[str, str]]:
    """``(boxed, verdict)``: the verdict, or ``(gold, answer)`` for math-verify to decide."""
    if not isinstance(response, str):
        raise TypeError(f"math_reward: response must be a str, got {type(response).__name__}")
    if truth is None or isinstance(truth, bool) or not isinstance(truth, (str, int, float)):
        raise TypeError(f"math_reward: truth must be a str or a number, got "
                        f"{type(truth).__name__}")
    require_math_verify()
    gold = reference_answer(str(truth))
    answer, boxed = extract_answer(response, fallback=fallback)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return boxed, False
    if same_answer(answer, gold):
        return boxed, True
    return boxed, (gold, answer)


def _score(correct: bool, boxed: bool, boxed_score: float,
           unboxed_score: float) -> tuple[float, dict[str, float]]:
    accuracy = 1.0 if correct else 0.0
    format_score = float(boxed_score if boxed else unboxed_score)
    return accuracy + format_score, {"accuracy": accuracy, "format_score": format_score}
