"""Finding the final answer in a model's response, and in a dataset's reference answer.

``extract_answer`` looks, in order, for:

1. the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces nested to any depth;
   escaped braces (``\\{``, ``\\}``) do not count. Of nested boxes the outermost wins; a
   box left open (a truncated response) is ignored;
2. with ``fallback``: the text after the last "answer is" / "answer:" (case-insensitive),
   up to the end of its line or sentence;
3. with ``fallback``: the last number in the text (``-3``, ``1,000``, ``2.5``, ``1/2``).

It reports whether the answer was boxed: the math reward's format score depends on it.
All scans are single regex passes, linear in the length of the text.
"""
from __future__ import annotations

import re

# The tokens that matter for boxes: a box opening, an escaped character, a brace.
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.S)
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)[ \t]*([^\n]+)", re.I)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# GSM8K's reference answers end with "#### <answer>".
_GSM8K_MARK = "####"


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}``/``\\fbox{...}``, or None."""
    first = min((i for i in (text.find("\\boxed"), text.find("\\fbox")) if i >= 0), default=-1)
    if first < 0:
        return None
    depth = 0
    opens: list[tuple[int, int]] = []      # (content start, depth outside the box)
    best: tuple[int, int] | None = None
    # Braces before the first box do not matter: a box closes back at its own depth.
    for m in _BOX_TOKENS.finditer(text, first):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            if depth:
                depth -= 1
            if opens and opens[-1][1] == depth:
                start, _ = opens.pop()
                best = (start, m.start())
        elif len(token) > 2:    # a box opening (else an escaped character: no grouping)
            opens.append((m.end(), depth))
            depth += 1
    if best is None:
        return None
    return text[best[0]:best[1]].strip()


def extract_answer(text: str, *, fallback: bool = True) -> tuple[str | None, bool]:
    """``(answer, boxed)``: the response's final answer (None if none is found) and whether it
    came from a box. See the module docstring for the rules."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, True
    if not fallback:
        return None, False
    stated = _ANSWER_IS.findall(text)
    if stated:
        answer = _strip_math(_SENTENCE_END.split(stated[-1], 1)[0].rstrip("."))
        if answer:
            return answer, False
    numbers = _NUMBER.findall(text)
    return (numbers[-1] if numbers else None), False


def reference_answer(truth: str) -> str:
    """The answer inside a dataset's reference: the last box if it has one, the part after
    GSM8K's ``####`` if it has that, else the whole reference (outer ``$`` removed)."""
    boxed = last_boxed(truth)
    if boxed is not None:
        return boxed
    return _strip_math(truth.rpartition(_GSM8K_MARK)[2])


def same_answer(a: str, b: str) -> bool:
    """Textually equal up to whitespace and outer ``$``: equal for any checker, no need to
    ask math-verify."""
    return _squeeze(_strip_math(a)) == _squeeze(_strip_math(b)) != ""


def _strip_math(s: str) -> str:
    return s.strip().strip("$").strip()


def _squeeze(s: str) -> str:
    return "".join(s.split())
