"""Built-in workflows and rewards (fastrollout.workflows): the registry, answer extraction,
the math reward and its verifier processes, MathWorkflow and the multi-turn env workflow,
run through a real RolloutCoordinator over SimulatedEngines."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import numpy as np
import pytest

from fastrollout import ConfigError, Task, Workflow
from fastrollout.engines import Completion, SimulatedEngine
from fastrollout.engines.base import HFTokenizerMixin
from fastrollout.workflows import (
    Env,
    GuessNumberEnv,
    MathVerifier,
    MathWorkflow,
    MathWorkflowSync,
    MultiTurnEnvWorkflow,
    Registry,
    extract_answer,
    get,
    get_env,
    math_reward,
    math_reward_async,
    names,
    reference_answer,
    register,
    register_env,
    set_default_verifier,
)
from fastrollout.workflows import verifier as verifier_module
from harness import Harness, make_config
from workflows import SyncWorkflow


@pytest.fixture(scope="module")
def verifier():
    """One warm worker process, the default verifier of the tests that use math-verify
    (starting one imports sympy)."""
    shared = MathVerifier(1)
    assert shared.verify("1", "1")
    set_default_verifier(shared)
    yield shared
    set_default_verifier(None)


class ScriptedEngine(SimulatedEngine):
    """A SimulatedEngine (its byte tokenizer and chat template) whose replies are given:
    ``reply(prompt_text, i)`` is the i-th sample's text. Logprobs are -0.01, -0.02, ..."""

    eos: int | None = None      # appended to replies that stop, as engines report it

    def __init__(self, reply, **kwargs):
        super().__init__(**kwargs)
        self.reply = reply
        self.prompts: list[str] = []

    async def generate(self, prompt_token_ids, params, *, request_id):
        prompt = self.decode(prompt_token_ids)
        self.prompts.append(prompt)
        out = []
        for i in range(params.n):
            text = self.reply(prompt, i)
            ids = np.asarray(self.encode(text), dtype=np.int32)
            reason = "stop"
            if params.max_tokens is not None and len(ids) > params.max_tokens:
                ids, reason = ids[:params.max_tokens], "length"
                text = self.decode(ids)
            elif self.eos is not None:
                ids = np.append(ids, np.int32(self.eos))
            logprobs = -np.arange(1, len(ids) + 1, dtype=np.float32) / 100
            out.append(Completion(ids, logprobs, reason, text))
        return out


def math_tasks(n, workflow=MathWorkflow, repeat=1, **raw):
    return [Task(workflow=workflow, repeat_times=repeat,
                 raw_task={"question": f"What is 1/2 + 0 ({i})?", "answer": "0.5", **raw})
            for i in range(n)]


async def run_batch(coord, tasks, batch_id=0):
    await coord.submit_batch(batch_id=batch_id, tasks=tasks, batch_type="train")
    state = coord.pending_batches[batch_id]
    result = await coord.finalize_train_batch(batch_id)
    exps = coord.take_experiences(batch_id)
    return result, state.statuses, (exps.to_experiences() if exps is not None else [])


# -- registry -----------------------------------------------------------------------------------

def test_builtins_are_registered_by_name():
    assert get("math") is MathWorkflow and get("math_sync") is MathWorkflowSync
    assert get("multi_turn_env") is MultiTurnEnvWorkflow
    assert {"math", "math_sync", "multi_turn_env"} <= set(names())
    assert get_env("guess_number") is GuessNumberEnv


def test_unknown_names_raise_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown workflow 'maths' \(registered: .*math, "
                                          r"math_sync, multi_turn_env"):
        get("maths")
    with pytest.raises(ConfigError, match=r"unknown env 'nope' \(registered: .*guess_number"):
        get_env("nope")


def test_a_dotted_name_imports_the_class():
    assert get("workflows.SyncWorkflow") is SyncWorkflow
    assert get_env("fastrollout.workflows.env.GuessNumberEnv") is GuessNumberEnv
    with pytest.raises(ConfigError, match=r"workflow 'nowhere.Flow' is neither registered nor "
                                          r"importable: ModuleNotFoundError"):
        get("nowhere.Flow")
    with pytest.raises(ConfigError, match=r"'workflows.Missing' is neither .* AttributeError"):
        get("workflows.Missing")
    with pytest.raises(ConfigError, match=r"workflow 'workflows.CALLS': expected a subclass "
                                          r"of Workflow, got Counter"):
        get("workflows.CALLS")


def test_register_checks_the_class_and_refuses_taking_a_name_twice():
    registry = Registry("workflow", Workflow)

    @registry.register("mine")
    class Mine(Workflow):
        pass

    assert registry.register("mine")(Mine) is Mine        # the same class again: a no-op
    assert registry.get("mine") is Mine and registry.names() == ["mine"]
    other = type("Other", (Workflow,), {})
    with pytest.raises(ValueError, match=r"'mine' is already registered to .*Mine "
                                         r"\(force=True replaces it\)"):
        registry.register("mine")(other)
    registry.register("mine", force=True)(other)
    assert registry.get("mine") is other
    with pytest.raises(TypeError, match="expected a subclass of Workflow"):
        registry.register("env")(GuessNumberEnv)
    with pytest.raises(TypeError, match="non-empty str"):
        registry.register("")


def test_register_and_register_env_are_the_package_registries():
    @register("test_builtin_custom")
    class Custom(Workflow):
        pass

    @register_env("test_builtin_custom_env")
    class CustomEnv(Env):
        pass

    assert get("test_builtin_custom") is Custom and get_env("test_builtin_custom_env") is CustomEnv


# -- answer extraction --------------------------------------------------------------------------

@pytest.mark.parametrize("text,answer,boxed", [
    (r"so the result is \boxed{42}.", "42", True),
    (r"\boxed{1} then \boxed{2}", "2", True),                              # the last box
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}", True),          # nested braces
    (r"\boxed{\boxed{2}+1}", r"\boxed{2}+1", True),                        # the outer box
    (r"\boxed{\{1,2\}}", r"\{1,2\}", True),                                # escaped braces
    (r"\fbox{7}", "7", True),
    (r"\boxed {x^{2}}", "x^{2}", True),
    (r"\boxed{5} and later \boxed{6", "5", True),                          # an open box
    ("The answer is 0.5. Done.", "0.5", False),
    ("Final answer: $\\frac{1}{2}$", "\\frac{1}{2}", False),
    ("the answer is: 12", "12", False),
    ("x = 3, so y = -4.5 and z = 1,000", "1,000", False),                  # the last number
    ("3/4 of them", "3/4", False),
    ("no idea", None, False),
])
def test_extract_answer(text, answer, boxed):
    assert extract_answer(text) == (answer, boxed)


def test_extract_answer_without_fallback_wants_a_box():
    assert extract_answer("The answer is 7", fallback=False) == (None, False)
    assert extract_answer(r"\boxed{7}", fallback=False) == ("7", True)


@pytest.mark.parametrize("truth,answer", [
    ("0.5", "0.5"), ("$\\frac{1}{2}$", "\\frac{1}{2}"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"), (r"so \boxed{3\pi}", r"3\pi"),
])
def test_reference_answer(truth, answer):
    assert reference_answer(truth) == answer


def test_extraction_is_linear_on_hostile_text():
    # Thousands of unclosed boxes and braces: one pass each, not one scan per box.
    text = "\\boxed{" * 20000 + "{" * 20000 + "1"
    assert extract_answer(text) == ("1", False)


# -- the math reward ----------------------------------------------------------------------------

@pytest.mark.parametrize("response,truth,reward,accuracy,fmt", [
    (r"... so \boxed{42}", "42", 1.1, 1.0, 0.1),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.1, 1.0, 0.1),                   # equivalent forms
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.1, 1.0, 0.1),
    (r"\boxed{1/2}", "0.5", 1.1, 1.0, 0.1),
    (r"\boxed{\sqrt{\frac{1}{4}}}", "1/2", 1.1, 1.0, 0.1),            # nested braces
    (r"\boxed{1,000}", "1000", 1.1, 1.0, 0.1),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.1, 1.0, 0.1),
    (r"\boxed{41}", "42", 0.1, 0.0, 0.1),                             # wrong
    ("I cannot solve this.", "42", -0.1, 0.0, -0.1),                  # missing
    ("The answer is 0.5.", r"\frac{1}{2}", 0.9, 1.0, -0.1),           # unboxed, right
    ("It is 72 clips.", "Natalia sold 48/2 = 24 clips.\n#### 72", 0.9, 1.0, -0.1),
    (r"\boxed{7}", 7, 1.1, 1.0, 0.1),                                 # a numeric truth
])
def test_math_reward(verifier, response, truth, reward, accuracy, fmt):
    got, metrics = math_reward(response, truth)
    assert got == pytest.approx(reward)
    assert metrics == {"accuracy": accuracy, "format_score": fmt}


def test_math_reward_options(verifier):
    assert math_reward("The answer is 3", "3", fallback=False) == (
        -0.1, {"accuracy": 0.0, "format_score": -0.1})
    assert math_reward(r"\boxed{3}", "3", boxed_score=0.0, unboxed_score=-1.0) == (
        1.0, {"accuracy": 1.0, "format_score": 0.0})
    assert math_reward("3", "3", boxed_score=0.0, unboxed_score=-1.0)[0] == 0.0


def test_math_reward_refuses_bad_input(verifier):
    with pytest.raises(TypeError, match="response must be a str, got NoneType"):
        math_reward(None, "1")
    with pytest.raises(TypeError, match="truth must be a str or a number, got NoneType"):
        math_reward("1", None)


async def test_math_reward_async_agrees_and_never_imports_math_verify_here(verifier):
    imported = "math_verify" in sys.modules     # by another test module (Trinity's code)
    responses = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", "answer is 0.5", "none"]
    got = await asyncio.gather(*(math_reward_async(r, "0.5") for r in responses))
    assert got == [math_reward(r, "0.5") for r in responses]
    # math-verify (and sympy's import and work) stay in the verifier's processes.
    assert ("math_verify" in sys.modules) == imported


def test_missing_math_verify_raises_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)     # find_spec() finds nothing
    monkeypatch.setattr(verifier_module, "_found", False)      # as in a fresh process
    with pytest.raises(ImportError, match=r"pip install 'fastrollout\[math\]'"):
        math_reward(r"\boxed{1}", "1")


def test_a_check_over_its_timeout_is_wrong_and_the_worker_stays_usable(verifier):
    before = verifier.timeouts
    # A fresh polynomial identity takes sympy far longer than a millisecond.
    assert verifier.verify("(x+7)^{9}", "x^9+63x^8+1", timeout=0.001) is False
    assert verifier.timeouts == before + 1
    assert verifier.verify("2", "2.0") is True


def test_a_worker_that_stops_answering_is_killed_and_replaced():
    own = MathVerifier(1, timeout=1.0, grace=0.5)
    try:
        assert own.verify("1", "1")
        (pid,) = own.worker_pids
        os.kill(pid, signal.SIGSTOP)       # stuck where no signal inside it helps
        assert own.verify("3", "3") is False
        assert own.timeouts == 1
        assert own.worker_pids == []       # killed, not kept
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert own.verify("3", "3") is True
        assert own.worker_pids != [pid]
    finally:
        own.close()


def test_a_worker_that_died_while_idle_is_replaced_before_a_check(verifier):
    (pid,) = verifier.worker_pids
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)     # dead, not yet reaped
    failures, timeouts = verifier.failures, verifier.timeouts
    assert verifier.verify("x+x", "2x") is True
    assert (verifier.failures, verifier.timeouts) == (failures, timeouts)
    assert verifier.worker_pids != [pid]


def test_equal_or_missing_answers_need_no_math_verify_check():
    closed = MathVerifier(1)
    closed.close()          # any check would raise
    assert math_reward(r"\boxed{ 1/2 }", "$1/2$", verifier=closed)[1]["accuracy"] == 1.0
    assert math_reward("no answer here", "7", verifier=closed)[1]["accuracy"] == 0.0
    with pytest.raises(RuntimeError, match="MathVerifier is closed"):
        math_reward(r"\boxed{0.5}", "1/2", verifier=closed)


def test_verifier_arguments_are_checked():
    with pytest.raises(ValueError, match="max_workers must be an int >= 1, got 0"):
        MathVerifier(0)
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        MathVerifier(timeout=float("nan"))
    closed = MathVerifier(1)
    closed.close()
    with pytest.raises(RuntimeError, match="MathVerifier is closed"):
        closed.verify("1", "1")


# -- MathWorkflow end to end --------------------------------------------------------------------

_REPLIES = [r"First 1/2, so \boxed{\frac{1}{2}}", "The answer is 0.5.", r"\boxed{3}", "hmm"]


@pytest.mark.parametrize("workflow", [MathWorkflow, MathWorkflowSync])
async def test_math_workflow_end_to_end(verifier, workflow):
    engine = ScriptedEngine(lambda prompt, i: _REPLIES[i % 4])
    async with Harness(make_config(max_timeout=60.0), [engine]) as coord:
        result, statuses, exps = await run_batch(coord, math_tasks(3, workflow, repeat=4))
    assert result["finished_task_count"] == 3 and all(s.ok for s in statuses.values())
    assert len(exps) == 12
    for exp in exps:
        assert exp.reward == pytest.approx([1.1, 0.9, 0.1, -0.1][exp.eid.run])
        assert set(exp.metrics) == {"accuracy", "format_score", "response_length"}
        assert exp.metrics["response_length"] == len(_REPLIES[exp.eid.run])
        assert exp.response_text == _REPLIES[exp.eid.run]
    assert sorted((e.eid.task, e.eid.run) for e in exps) == [(t, r) for t in range(3)
                                                               for r in range(4)]
    # One request per task, n samples, through the chat template with the system prompt.
    assert len(engine.prompts) == 3
    assert engine.prompts[0].startswith("<|system|>Please reason step by step, and put your "
                                        "final answer within \\boxed{}.\n<|user|>What is 1/2")
    metrics = result["metrics"]
    assert metrics["rollout/accuracy/mean"] == pytest.approx(0.5)
    assert metrics["rollout/format_score/mean"] == pytest.approx(0.0)


async def test_math_workflow_on_random_text_and_split_repeats(verifier):
    config = make_config(max_timeout=60.0, max_repeat_times_per_runner=3)
    async with Harness(config, [SimulatedEngine(output_len=24)]) as coord:
        _, statuses, exps = await run_batch(coord, math_tasks(2, repeat=8))
    assert all(s.ok for s in statuses.values())
    # Sub-tasks of 3, 3 and 2 runs: run ids are still 0..7 per task.
    assert sorted((e.eid.task, e.eid.run) for e in exps) == [(t, r) for t in range(2)
                                                               for r in range(8)]
    for exp in exps:
        assert exp.metrics["accuracy"] == 0.0 and exp.metrics["format_score"] == -0.1
        assert exp.metrics["response_length"] == 24 == len(exp.logprobs)


async def test_math_workflow_arguments(verifier):
    engine = ScriptedEngine(lambda prompt, i: r"\boxed{0.5}")
    task = math_tasks(1)[0]
    task.raw_task = {"problem": "Half?", "solution": "1/2"}
    task.workflow_args = {"prompt_key": "problem", "answer_key": "solution",
                          "system_prompt": None}
    task.reward_fn_args = {"boxed_score": 0.5}
    async with Harness(make_config(max_timeout=60.0), [engine]) as coord:
        _, _, (exp,) = await run_batch(coord, [task])
    assert engine.prompts == ["<|user|>Half?\n<|assistant|>"]
    assert exp.reward == 1.5


@pytest.mark.parametrize("change,message", [
    ({"workflow_args": {"prompt": "q"}},
     r"task 1 of batch 0: workflow_args.prompt: unknown key \(known keys: prompt_key, "),
    ({"workflow_args": {"system_prompt": 3}},
     r"task 1 of batch 0: workflow_args.system_prompt: expected `str \| null`, got `int`"),
    ({"reward_fn_args": {"timeout": 0}},
     r"task 1 of batch 0: reward_fn_args.timeout: expected `float` > 0"),
    ({"raw_task": {"q": 1}},
     r"task 1 of batch 0: raw_task has no 'question' \(workflow_args.prompt_key\); it has \['q'\]"),
    ({"reward_fn": object}, r"MathWorkflow rewards with math_reward"),
])
async def test_bad_math_task_fails_alone_naming_the_key(verifier, change, message):
    tasks = math_tasks(3)
    for name, value in change.items():
        setattr(tasks[1], name, value)
    engine = ScriptedEngine(lambda prompt, i: r"\boxed{0.5}")
    async with Harness(make_config(max_timeout=60.0), [engine]) as coord:
        _, statuses, exps = await run_batch(coord, tasks)
    assert [statuses[i].ok for i in range(3)] == [True, False, True]
    assert "ConfigError" in statuses[1].message
    assert re.search(message, statuses[1].message), statuses[1].message
    assert len(exps) == 2


# -- the multi-turn env workflow ----------------------------------------------------------------

class StepEnv(Env):
    """Observation "obs k" after turn k, reward 0.25 * k, done after ``raw_task["done_at"]``
    turns (never if absent); raises in step when ``raw_task["fail"]``."""

    closed = 0

    def reset(self, task):
        self.raw = task.raw_task
        self.turn = 0
        return "start"

    def step(self, action):
        self.turn += 1
        if self.raw.get("fail"):
            raise RuntimeError("the env broke")
        return f"obs {self.turn}", 0.25 * self.turn, self.turn == self.raw.get("done_at")

    def close(self):
        type(self).closed += 1


class AsyncStepEnv(StepEnv):
    async def reset(self, task):
        await asyncio.sleep(0)
        return StepEnv.reset(self, task)

    async def step(self, action):
        await asyncio.sleep(0)
        return StepEnv.step(self, action)


class BlockingStepEnv(StepEnv):
    blocking = True
    steps_on_loop = 0

    def step(self, action):
        try:
            asyncio.get_running_loop()
            type(self).steps_on_loop += 1
        except RuntimeError:        # in a thread: as a blocking env's steps must be
            pass
        return super().step(action)


class StuckEnv(StepEnv):
    """Episode 0's step fails at once; the other episodes' steps never return."""

    episodes = 0

    def reset(self, task):
        self.episode = type(self).episodes
        type(self).episodes += 1
        return super().reset(task)

    async def step(self, action):
        if self.episode == 0:
            raise RuntimeError("episode 0 broke")
        await asyncio.Event().wait()


for _name, _cls in [("test_step", StepEnv), ("test_step_async", AsyncStepEnv),
                    ("test_step_blocking", BlockingStepEnv), ("test_stuck", StuckEnv)]:
    register_env(_name)(_cls)


def env_tasks(n, env="test_step", repeat=1, raw=None, **args):
    return [Task(workflow=MultiTurnEnvWorkflow, repeat_times=repeat,
                 workflow_args={"env": env, **args}, raw_task=dict(raw or {}))
            for _ in range(n)]


def render(engine, messages):
    """What the chat template makes of a conversation that ends with the model's reply."""
    text = engine.decode(engine.apply_chat_template(messages))
    assert text.endswith("\n<|assistant|>")
    return text[:-len("<|assistant|>")]


@pytest.mark.parametrize("env", ["test_step", "test_step_async", "test_step_blocking"])
async def test_multi_turn_mask_covers_exactly_the_model_tokens(env):
    engine = SimulatedEngine(output_len=9, seed=3)
    tasks = env_tasks(2, env, repeat=2, max_turns=3, system_prompt="Play.")
    async with Harness(make_config(), [engine]) as coord:
        _, statuses, exps = await run_batch(coord, tasks)
    assert all(s.ok for s in statuses.values()) and len(exps) == 4
    for exp in exps:
        tokens, plen = exp.tokens, exp.prompt_length
        response, mask = tokens[plen:], exp.action_mask
        assert mask.dtype == np.bool_ and len(mask) == len(response) == len(exp.logprobs)
        replies = [m["content"] for m in exp.messages if m["role"] == "assistant"]
        assert len(replies) == 3 and all(len(r) == 9 for r in replies)
        assert engine.decode(response[mask]) == "".join(replies)
        assert engine.decode(response[~mask]) == "\n<|user|>obs 1\n<|assistant|>" \
                                                 "\n<|user|>obs 2\n<|assistant|>"
        # The whole experience is the template's rendering of the conversation.
        assert [m["role"] for m in exp.messages] == ["system", "user", "assistant", "user",
                                                     "assistant", "user", "assistant"]
        assert engine.decode(tokens) == render(engine, exp.messages)[:-1]
        assert engine.decode(tokens[:plen]) == "<|system|>Play.\n<|user|>start\n<|assistant|>"
        assert np.all(exp.logprobs[~mask] == 0) and np.all(exp.logprobs[mask] < 0)
        assert exp.reward == pytest.approx(0.25 + 0.5 + 0.75)
        assert exp.metrics == {"turns": 3.0, "env_done": 0.0, "env_reward": 1.5,
                               "response_length": 27.0}
        assert exp.truncate_status is None
    assert sorted(e.eid.run for e in exps) == [0, 0, 1, 1]
    assert BlockingStepEnv.steps_on_loop == 0


async def test_one_failed_episode_stops_and_closes_the_others_of_its_task():
    StuckEnv.closed = StuckEnv.episodes = 0
    async with Harness(make_config(max_timeout=60.0), [SimulatedEngine(output_len=4)]) as coord:
        _, statuses, exps = await run_batch(coord, env_tasks(1, "test_stuck", repeat=3))
        assert "RuntimeError: episode 0 broke" in statuses[0].message and exps == []
        assert StuckEnv.closed == 3     # the stuck episodes were cancelled and closed


async def test_multi_turn_logprobs_are_the_engines_for_the_model_tokens():
    engine = ScriptedEngine(lambda prompt, i: "abc" if "obs" not in prompt else "de")
    async with Harness(make_config(), [engine]) as coord:
        _, _, (exp,) = await run_batch(coord, env_tasks(1, max_turns=2))
    lp = exp.logprobs
    np.testing.assert_allclose(lp[exp.action_mask], [-0.01, -0.02, -0.03, -0.01, -0.02])
    assert engine.prompts == ["<|user|>start\n<|assistant|>",
                              "<|user|>start\n<|assistant|>abc\n<|user|>obs 1\n<|assistant|>"]


@pytest.mark.parametrize("args,raw,reward,turns,done", [
    ({"max_turns": 5}, {"done_at": 2}, 0.75, 2, 1.0),                   # the env ends it
    ({"max_turns": 5, "reward": "last"}, {"done_at": 3}, 0.75, 3, 1.0),
    ({"max_turns": 4}, {}, 2.5, 4, 0.0),                                # max_turns ends it
    ({"max_turns": 4, "reward": "last"}, {}, 1.0, 4, 0.0),
    ({"max_turns": 1}, {}, 0.25, 1, 0.0),
])
async def test_multi_turn_rewards_and_turns(args, raw, reward, turns, done):
    async with Harness(make_config(), [SimulatedEngine(output_len=4)]) as coord:
        _, _, (exp,) = await run_batch(coord, env_tasks(1, raw=raw, **args))
    assert exp.reward == pytest.approx(reward)
    assert exp.metrics["turns"] == turns and exp.metrics["env_done"] == done
    assert exp.action_mask.sum() == 4 * turns
    assert exp.messages[-1]["role"] == "assistant"      # ends with the model's last reply


async def test_a_failing_env_fails_only_its_task():
    StepEnv.closed = 0
    tasks = env_tasks(3, repeat=2, max_turns=2)
    tasks[1].raw_task = {"fail": True}
    async with Harness(make_config(), [SimulatedEngine(output_len=4)]) as coord:
        _, statuses, exps = await run_batch(coord, tasks)
        assert [statuses[i].ok for i in range(3)] == [True, False, True]
        assert "RuntimeError: the env broke" in statuses[1].message
        assert len(exps) == 4 and {e.eid.task for e in exps} == {0, 2}
        assert StepEnv.closed == 6      # every episode's env, the failed ones' too
        _, statuses, _ = await run_batch(coord, env_tasks(1), batch_id=1)
        assert statuses[0].ok


async def test_guess_number_env_end_to_end():
    def binary_search(prompt, i):
        low, high = 1, 100
        for word in prompt.split("<|user|>")[2:]:
            guess = int(word.split()[0])
            low, high = (guess + 1, high) if "too low" in word else (low, guess - 1)
        return f"My guess: {(low + high) // 2}"

    engine = ScriptedEngine(binary_search)
    task = Task(workflow=MultiTurnEnvWorkflow, workflow_args={"env": "guess_number"},
                raw_task={"secret": 37})
    async with Harness(make_config(), [engine]) as coord:
        _, _, (exp,) = await run_batch(coord, [task])
    guesses = [m["content"] for m in exp.messages if m["role"] == "assistant"]
    assert guesses == ["My guess: 50", "My guess: 25", "My guess: 37"]
    assert [m["content"] for m in exp.messages if m["role"] == "user"][1:] == [
        "50 is too high.", "25 is too low."]
    assert exp.reward == 1.0 and exp.metrics["env_done"] == 1.0


def test_guess_number_env_steps():
    env = GuessNumberEnv(low=1, high=10)
    task = Task(workflow=MultiTurnEnvWorkflow, raw_task={"secret": 4})
    assert "from 1 to 10" in env.reset(task)
    assert env.step("maybe 7?") == ("7 is too high.", 0.0, False)
    assert env.step("no clue") == ("Reply with one integer.", 0.0, False)
    assert env.step("9" * 50)[0].endswith("is too high.")
    assert env.step("then 4") == ("Correct!", 1.0, True)
    with pytest.raises(ConfigError, match=r"raw_task\['secret'\], an int from 1 to 10, got 11"):
        env.reset(Task(workflow=MultiTurnEnvWorkflow, raw_task={"secret": 11}))


async def test_a_reply_ending_with_the_templates_closing_token_keeps_it_once():
    engine = ScriptedEngine(lambda prompt, i: "line\n")
    async with Harness(make_config(), [engine]) as coord:
        _, _, (exp,) = await run_batch(coord, env_tasks(1, max_turns=2))
    response = exp.tokens[exp.prompt_length:]
    assert engine.decode(response) == "line\n<|user|>obs 1\n<|assistant|>line\n"
    assert engine.decode(response[exp.action_mask]) == "line\nline\n"


async def test_max_model_len_stops_the_episode_as_truncated():
    prompt = len("<|user|>start\n<|assistant|>")
    between = len("\n<|user|>obs 1\n<|assistant|>")
    # Room for the first reply (10 tokens) but not for the next observation.
    tasks = env_tasks(2, max_turns=3, max_model_len=prompt + 10 + between)
    tasks[1].workflow_args["max_model_len"] = prompt + 6        # the first reply is cut
    async with Harness(make_config(), [SimulatedEngine(output_len=10)]) as coord:
        _, _, exps = await run_batch(coord, tasks)
    first, second = sorted(exps, key=lambda e: e.eid.task)
    assert first.metrics["turns"] == 1 and first.truncate_status == "response_truncated"
    assert len(first.tokens) == prompt + 10
    assert len(second.tokens) == prompt + 6 and second.truncate_status == "response_truncated"


class HFScriptedEngine(HFTokenizerMixin, ScriptedEngine):
    """Scripted replies, a Hugging Face tokenizer and its chat template (the tiny model's:
    ``<|role|>content</s>`` per message), replies ending with the EOS token ``</s>``."""

    name = "hf-scripted"

    def __init__(self, folder, reply):
        super().__init__(reply)
        from transformers import AutoTokenizer
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos = self._tokenizer.eos_token_id


async def test_multi_turn_with_a_hugging_face_chat_template(tiny_model):
    pytest.importorskip("transformers")
    engine = HFScriptedEngine(tiny_model, lambda prompt, i: "I guess 50")
    async with Harness(make_config(), [engine]) as coord:
        _, _, (exp,) = await run_batch(coord, env_tasks(1, max_turns=3))
    tokens, plen, mask = exp.tokens.tolist(), exp.prompt_length, exp.action_mask
    # Exactly the template's rendering: the sampled EOS closes each reply, once.
    rendered = engine.apply_chat_template(exp.messages)
    assert tokens == rendered[:-1]      # all but the next reply's header
    reply = [*engine.encode("I guess 50"), engine.eos]
    assert np.asarray(tokens[plen:])[mask].tolist() == reply * 3
    assert engine.decode(np.asarray(tokens[plen:])[~mask]) == (
        "<|user|>obs 1</s><|assistant|><|user|>obs 2</s><|assistant|>")


class ForgetfulEngine(SimulatedEngine):
    """Its template drops earlier replies, as templates that strip past reasoning do."""

    def apply_chat_template(self, messages):
        kept = [m for m in messages[:-2] if m["role"] != "assistant"] + messages[-2:]
        return super().apply_chat_template(kept)


@pytest.mark.parametrize("args,message", [
    ({}, r"workflow_args.env: required key is missing"),
    ({"env": "nope"}, r"unknown env 'nope'"),
    ({"env": "test_step", "max_turns": 0}, r"workflow_args.max_turns: expected `int` >= 1"),
    ({"env": "test_step", "reward": "mean"}, r"workflow_args.reward: invalid enum value 'mean'"),
    ({"env": "test_step", "env_args": {"x": 1}}, r"workflow_args.env_args: StepEnv"),
    ({"env": "guess_number"}, r"GuessNumberEnv needs raw_task\['secret'\]"),
    ({"env": "test_step", "max_model_len": 5}, r"the first prompt has 27 tokens, max_model_len"),
])
async def test_bad_multi_turn_task_fails_alone(args, message):
    tasks = env_tasks(3, max_turns=2)
    tasks[1].workflow_args = args
    async with Harness(make_config(), [SimulatedEngine(output_len=4)]) as coord:
        _, statuses, exps = await run_batch(coord, tasks)
    assert [statuses[i].ok for i in range(3)] == [True, False, True]
    assert re.search(message, statuses[1].message), statuses[1].message
    assert len(exps) == 2


async def test_a_template_that_rewrites_earlier_turns_is_refused():
    async with Harness(make_config(), [ForgetfulEngine(output_len=4)]) as coord:
        _, statuses, _ = await run_batch(coord, env_tasks(1, max_turns=3))
    assert not statuses[0].ok
    assert "ChatTemplateError: the chat template of ForgetfulEngine renders turn 2" \
        in statuses[0].message
