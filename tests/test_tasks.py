"""Tasks: generated sets, hub-format loaders on local fixtures, sandboxed execution, mixtures, scoring, eval runners.

No test touches the network: hub names are checked by replacing `datasets.load_dataset` with a fixture reader.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recursive_model.calculator import calculate
from recursive_model.recurrence import ExitRule
from recursive_model.tasks import (
    ARC,
    GSM8K,
    MIXTURE_PRESETS,
    MMLU,
    TASK_REGISTRY,
    Arithmetic,
    EvalResult,
    HumanEval,
    Identity,
    Reasoning,
    SmolTalk,
    SpellingBee,
    TaskMixture,
    build_mixture,
    build_task,
    centered_accuracy,
    chatcore,
    execute_program,
    extract_final_answer,
    gsm8k_to_parts,
    load_rows,
    run_categorical,
    run_generative,
)
from recursive_model.tasks import execution as execution_module
from recursive_model.tasks.reasoning import (
    HARD_DIFFICULTY,
    POINTER_STATEMENTS,
    PROMPT_MAX_BYTES,
    TRAIN_DIFFICULTY,
    WALK_MOVES,
    is_held_out,
)
from recursive_model.tokenizer import SPECIAL_TOKENS, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
GENERATED = ("identity", "arithmetic", "spelling_bee", "reasoning")


def fixture(name: str) -> str:
    return str(FIXTURES / name)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # Few merges on purpose: close to byte-level, the worst case for prompt lengths.
    return Tokenizer.train(["hello world, the answer is 42. k=7;d=k+5;w=d-3;w?"] * 20, vocab_size=300)


# ------------------------------------------------------------------------------------------------------- base / slicing


def test_slicing_is_deterministic_and_validated():
    full = Reasoning(size=20)
    sliced = Reasoning(size=20, start=2, stop=11, step=3)
    assert len(sliced) == 3
    assert [sliced[i] for i in range(3)] == [full[2], full[5], full[8]]
    assert sliced[-1] == full[8]
    assert list(sliced) == [full[2], full[5], full[8]]
    assert len(Reasoning(size=5, start=3, stop=100)) == 2  # stop is clamped to the data
    with pytest.raises(IndexError):
        sliced[3]
    for kwargs, field in [({"start": -1}, "start"), ({"start": 5, "stop": 2}, "stop"), ({"step": 0}, "step")]:
        with pytest.raises(ValueError, match=field):
            Reasoning(size=20, **kwargs)


def test_generated_tasks_are_deterministic_per_seed():
    for name in GENERATED:
        a, b, c = build_task(name, size=30), build_task(name, size=30), build_task(name, size=30, seed=7)
        assert list(a) == list(b), name
        assert list(a) != list(c), name


_PART_MARKERS = {
    "python": ("<|python_start|>", "<|python_end|>"),
    "python_output": ("<|output_start|>", "<|output_end|>"),
}


def _assert_renders_as_prompt_plus_answer(tokenizer: Tokenizer, conversation: dict) -> None:
    """The full render is the completion prompt followed by the last assistant turn, trained on except tool output."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**9)
    prompt = tokenizer.render_for_completion(conversation)
    assert len(ids) == len(mask)
    assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>") and ids[: len(prompt)] == prompt
    content = conversation["messages"][-1]["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    shown, trained = "", ""
    for part in parts:
        start, end = _PART_MARKERS.get(part["type"], ("", ""))
        shown += start + part["text"] + end
        trained += "" if part["type"] == "python_output" else start + part["text"] + end
    answer, answer_mask = ids[len(prompt) :], mask[len(prompt) :]
    assert tokenizer.decode(answer) == shown + "<|assistant_end|>"
    assert tokenizer.decode([t for t, m in zip(answer, answer_mask, strict=True) if m]) == trained + "<|assistant_end|>"


def test_generated_conversations_render_with_the_real_tokenizer(tokenizer):
    for name in GENERATED:
        for conversation in build_task(name, size=40):
            _assert_renders_as_prompt_plus_answer(tokenizer, conversation)


def test_loaded_conversations_render_with_the_real_tokenizer(tokenizer):
    tasks = [
        ARC(source=fixture("arc_easy.jsonl")),
        MMLU(source=fixture("mmlu.jsonl")),
        GSM8K(source=fixture("gsm8k.jsonl")),
        HumanEval(source=fixture("humaneval.jsonl")),
        SmolTalk(source=fixture("smoltalk.jsonl")),
    ]
    for task in tasks:
        assert len(task) > 0, task.name
        for conversation in task:
            _assert_renders_as_prompt_plus_answer(tokenizer, conversation)


# ---------------------------------------------------------------------------------------------------- generated sets


def test_identity_answers_name_the_model():
    task = Identity(size=50)
    for conversation in task:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert task.evaluate(conversation, conversation["messages"][-1]["content"])
    assert not task.evaluate(task[0], "I am a cat.")


def test_arithmetic_uses_calculator_parts_that_the_engine_calculator_agrees_with():
    task = Arithmetic(size=100)
    assert task.eval_type == "generative"
    for conversation in task:
        parts = conversation["messages"][-1]["content"]
        python = next(p for p in parts if p["type"] == "python")
        output = next(p for p in parts if p["type"] == "python_output")
        assert calculate(python["text"]) == output["text"]
        assert parts[-1]["text"].endswith(f"#### {output['text']}")
        assert task.evaluate(conversation, f"blah <|python_start|>x<|python_end|> #### {output['text']}")
        assert not task.evaluate(conversation, f"#### {int(output['text']) + 1}")
        assert not task.evaluate(conversation, output["text"])  # no #### marker


def test_spelling_bee_counts_by_hand_and_with_the_calculator():
    task = SpellingBee(size=100)
    for conversation in task:
        question = conversation["messages"][0]["content"]
        parts = conversation["messages"][-1]["content"]
        python = next(p for p in parts if p["type"] == "python")
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", python["text"]).groups()
        assert word in question and letter in question
        assert calculate(python["text"]) == str(word.count(letter))
        assert extract_final_answer(parts[-1]["text"]) == str(word.count(letter))
        assert task.evaluate(conversation, f"#### {word.count(letter)}")
    manual = SpellingBee(size=5, calculator=False)[0]["messages"][-1]["content"]
    assert [p["type"] for p in manual] == ["text"]


# ------------------------------------------------------------------------------------------------------------ reasoning


def _solve_chain(prompt: str) -> int:
    """Independent solver: resolve assignments in any order."""
    *statements, question = prompt.split(";")
    pending = dict(s.split("=") for s in statements)
    values: dict[str, int] = {}
    while pending:
        for name, expr in list(pending.items()):
            m = re.fullmatch(r"(\d+)|([a-z])([+-])(\d)", expr)
            if m.group(1):
                values[name] = int(m.group(1))
            elif m.group(2) in values:
                sign = 1 if m.group(3) == "+" else -1
                values[name] = values[m.group(2)] + sign * int(m.group(4))
            else:
                continue
            del pending[name]
    return values[question.rstrip("?")]


@pytest.mark.parametrize("order", ["forward", "shuffled"])
def test_reasoning_chain_answers_and_difficulty(order):
    for split, (lo, hi) in [("train", TRAIN_DIFFICULTY), ("eval", TRAIN_DIFFICULTY), ("hard", HARD_DIFFICULTY)]:
        task = Reasoning("chain", split, order=order, size=200)
        hops = set()
        for i, conversation in enumerate(task):
            prompt, answer = (m["content"] for m in conversation["messages"])
            assert str(_solve_chain(prompt)) == answer
            assert 0 <= int(answer) <= 99
            hops.add(task.problem(i)[2])
            assert prompt.count(";") == task.problem(i)[2] + 1
        assert hops == set(range(lo, hi + 1)), split


def _follow_pointer(prompt: str) -> tuple[str, int]:
    """(answer, hops) by following the asked name's copies down to its digit."""
    *statements, question = prompt.split(";")
    rhs = dict(st.split("=") for st in statements)
    name, hops = question.rstrip("?"), 0
    while not rhs[name].isdigit():
        name, hops = rhs[name], hops + 1
    return rhs[name], hops


@pytest.mark.parametrize("order", ["forward", "shuffled"])
def test_reasoning_pointer_answers_difficulty_and_shape(order):
    for split, (lo, hi) in [("train", TRAIN_DIFFICULTY), ("eval", TRAIN_DIFFICULTY), ("hard", HARD_DIFFICULTY)]:
        task = Reasoning("pointer", split, order=order, size=300)
        hops = set()
        for i, conversation in enumerate(task):
            prompt, answer = (m["content"] for m in conversation["messages"])
            statements = prompt.split(";")[:-1]
            assert len(statements) == POINTER_STATEMENTS  # the length does not grow with difficulty
            assert len({st.split("=")[0] for st in statements}) == POINTER_STATEMENTS  # one definition per name
            assert sorted(st[2] for st in statements if st[2].isdigit()) == sorted(
                set(st[2] for st in statements if st[2].isdigit()))  # three chains, three distinct digits
            assert (answer, task.problem(i)[2]) == _follow_pointer(prompt)
            assert answer in "0123456789"  # every split answers a digit: hard tests depth, not unseen outputs
            if order == "forward":  # every definition comes before its use
                seen = set()
                for st in statements:
                    lhs, rhs = st.split("=")
                    assert rhs.isdigit() or rhs in seen
                    seen.add(lhs)
            hops.add(task.problem(i)[2])
        assert hops == set(range(lo, hi + 1)), split


def test_reasoning_walk_answers_difficulty_and_shape():
    moves = {name: dict(enumerate(image)) for name, image in WALK_MOVES.items()}
    assert all(sorted(m.values()) == list(range(10)) for m in moves.values())  # each move is a permutation
    # Order matters: some pair of moves does not commute, so a walk can only be solved by composing in order.
    assert any(moves[a][moves[b][d]] != moves[b][moves[a][d]] for a in moves for b in moves for d in range(10))
    for split, (lo, hi) in [("train", TRAIN_DIFFICULTY), ("eval", (2, 4)), ("hard", HARD_DIFFICULTY)]:
        task = Reasoning("walk", split, size=400)
        hops, answers = set(), set()
        for i, conversation in enumerate(task):
            prompt, answer = (m["content"] for m in conversation["messages"])
            start, *letters = prompt.removesuffix("?").split(";")
            digit = int(start)
            for letter in letters:  # recomputed by hand from the table
                digit = moves[letter][digit]
            assert str(digit) == answer
            assert task.problem(i)[2] == len(letters)
            assert len(prompt) == 2 * len(letters) + 2  # start digit, ';' + letter per move, '?'
            hops.add(len(letters))
            answers.add(answer)
        # No one-move walk is held out (it is a table entry only training shows): eval walks have 2-4 moves.
        assert hops == set(range(lo, hi + 1)), split
        assert answers == set("0123456789"), split  # every digit answers: hard tests depth, not unseen outputs
    assert not is_held_out("3;c?")


def test_walk_state_targets_are_the_digit_after_each_move():
    plain, targeted = Reasoning("walk", size=60), Reasoning("walk", size=60, state_targets=True)
    for i in range(60):
        assert "prompt_targets" not in plain[i]
        conversation = targeted[i]
        assert conversation["messages"] == plain[i]["messages"]  # prompt and answer unchanged
        prompt, answer = (m["content"] for m in conversation["messages"])
        start, *letters = prompt.removesuffix("?").split(";")
        digit, expected = int(start), [(1, start)]
        for k, letter in enumerate(letters):
            digit = WALK_MOVES[letter][digit]
            expected.append((2 * k + 3, str(digit)))  # after "7;c" (3 characters), "7;c;a" (5), ...
        assert conversation["prompt_targets"] == expected
        assert expected[-1][1] == answer and conversation["difficulty"] == len(letters)


def test_reasoning_sum_answers():
    for split in ("train", "eval", "hard"):
        for conversation in Reasoning("sum", split, size=100):
            prompt, answer = (m["content"] for m in conversation["messages"])
            assert str(sum(int(x) for x in prompt.removesuffix("=?").split("+"))) == answer


def test_reasoning_held_out_sets_are_fixed_and_disjoint_from_training():
    for kind in ("pointer", "chain", "sum", "walk"):
        train = {c["messages"][0]["content"] for c in Reasoning(kind, "train", size=3000)}
        train |= {c["messages"][0]["content"] for c in Reasoning(kind, "train", size=3000, seed=1)}
        for split in ("eval", "hard"):
            held = Reasoning(kind, split)
            assert len(held) == 500
            prompts = {c["messages"][0]["content"] for c in held}
            assert not prompts & train
            assert all(is_held_out(p) for p in prompts)
            assert list(held) == list(Reasoning(kind, split))
    with pytest.raises(ValueError, match="seed"):
        Reasoning(split="eval", seed=3)


def test_reasoning_prompts_stay_short(tokenizer):
    hardest = [Reasoning("chain", "hard", difficulty=8, size=200), Reasoning("sum", "hard", difficulty=16, size=200),
               Reasoning("pointer", "hard", difficulty=9, size=200), Reasoning("walk", "hard", difficulty=16, size=200)]
    for task in hardest:
        for conversation in task:
            assert len(conversation["messages"][0]["content"].encode()) <= PROMPT_MAX_BYTES
            assert len(tokenizer.render_for_completion(conversation)) < 64


def test_reasoning_grading_is_exact_match():
    task = Reasoning("chain", "eval", size=5)
    conversation = task[0]
    answer = conversation["messages"][-1]["content"]
    assert task.evaluate(conversation, answer)
    assert task.evaluate(conversation, f" {answer}<|assistant_end|>")
    assert task.evaluate(conversation, f"so #### {answer}")
    assert not task.evaluate(conversation, answer + "0")
    assert not task.evaluate(conversation, f"{answer} apples")


def test_reasoning_rejects_bad_config():
    for kwargs, field in [
        ({"kind": "tree"}, "kind"),
        ({"split": "test"}, "split"),
        ({"difficulty": 10}, "difficulty"),  # pointer: at most POINTER_STATEMENTS - 3 hops
        ({"kind": "chain", "difficulty": 9}, "difficulty"),
        ({"difficulty": (3, 2)}, "difficulty"),
        ({"kind": "sum", "order": "shuffled"}, "order"),
        ({"kind": "walk", "order": "shuffled"}, "order"),
        ({"kind": "walk", "difficulty": 17}, "difficulty"),
        ({"kind": "pointer", "state_targets": True}, "state_targets"),
        ({"size": 0}, "size"),
    ]:
        with pytest.raises(ValueError, match=field):
            Reasoning(**kwargs)


# ------------------------------------------------------------------------------------------------------------- loaders


def test_arc_from_local_file():
    task = ARC(source=fixture("arc_easy.jsonl"))
    assert len(task) == 4 and task.eval_type == "categorical" and task.name == "ARC-Easy"
    first = task[0]
    assert "- the Sun=B" in first["messages"][0]["content"]
    assert first["messages"][1]["content"] == "B" and first["letters"] == ["A", "B", "C", "D"]
    assert task[1]["letters"] == ["A", "B", "C"]  # 3 choices
    assert task[2]["letters"] == ["1", "2", "3", "4"] and task[2]["messages"][1]["content"] == "2"
    assert task.evaluate(first, "B") and not task.evaluate(first, "A")
    assert len(ARC("ARC-Challenge", source=fixture("arc_challenge.jsonl"))[1]["letters"]) == 5


def test_arc_rejects_answer_outside_labels(tmp_path):
    row = json.loads(Path(fixture("arc_easy.jsonl")).read_text().splitlines()[0]) | {"answerKey": "E"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="answerKey='E'"):
        ARC(source=str(path))[0]


def test_mmlu_and_auxiliary_train():
    task = MMLU(source=fixture("mmlu.jsonl"))
    assert [c["messages"][1]["content"] for c in task] == ["A", "C", "B", "D"]
    assert task[1]["subject"] == "astronomy"
    aux = build_task("mmlu_aux", source=fixture("mmlu_aux.jsonl"))  # hub rows wrapped in {"train": {...}}
    assert [c["messages"][1]["content"] for c in aux] == ["B", "C", "A"]
    assert "- whale=B" in aux[0]["messages"][0]["content"]
    with pytest.raises(ValueError, match="split"):
        MMLU(subset="auxiliary_train", split="test", source=fixture("mmlu_aux.jsonl"))


def test_gsm8k_calculator_annotations_become_tool_calls():
    task = GSM8K(source=fixture("gsm8k.jsonl"))
    parts = task[0]["messages"][1]["content"]
    assert parts == [
        {"type": "text", "text": "Tom has 3*12="},
        {"type": "python", "text": "3*12"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": "36 apples.\nAfter eating, he has 36-5="},
        {"type": "python", "text": "36-5"},
        {"type": "python_output", "text": "31"},
        {"type": "text", "text": "31 apples.\n#### 31"},
    ]
    assert task.evaluate(task[0], "... so #### 31<|assistant_end|>")
    assert not task.evaluate(task[0], "#### 32") and not task.evaluate(task[0], "31")
    assert task.evaluate(task[2], "#### 300")
    assert gsm8k_to_parts("x <<7>> y") == [
        {"type": "text", "text": "x "},
        {"type": "python", "text": "7"},
        {"type": "python_output", "text": ""},
        {"type": "text", "text": " y"},
    ]


def test_smoltalk_keeps_system_message_and_rejects_bad_turns(tmp_path):
    task = SmolTalk(source=fixture("smoltalk.jsonl"))
    assert len(task) == 3
    assert [m["role"] for m in task[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]})
    )
    with pytest.raises(ValueError, match="turn 0"):
        SmolTalk(source=str(path))[0]


def test_parquet_source_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = load_rows(fixture("arc_easy.jsonl"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc.parquet")
    assert list(ARC(source=str(tmp_path / "arc.parquet"))) == list(ARC(source=fixture("arc_easy.jsonl")))


def test_missing_local_source_names_the_path():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        GSM8K(source="/no/such/dir/nope.jsonl")


def test_hub_names_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return load_rows(fixture("arc_challenge.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = build_task("arc_challenge", split="validation")
    assert len(task) == 3
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "validation")]


# ----------------------------------------------------------------------------------------------- sandboxed execution


def test_humaneval_grades_by_running_the_tests():
    task = HumanEval(source=fixture("humaneval.jsonl"), timeout=5.0)
    for conversation in task:
        assert task.evaluate(conversation, conversation["messages"][1]["content"]), conversation["task_id"]
    # The imports of the prompt are added; a fenced block is extracted from chatty text.
    fenced = "Here you go:\n```python\ndef sum_list(numbers):\n    return sum(numbers)\n```\nDone.<|assistant_end|>"
    assert task.evaluate(task[0], fenced)
    assert not task.evaluate(task[0], "def sum_list(numbers):\n    return 0\n")
    assert not task.evaluate(task[2], "def hypotenuse(a, b):\n    return math.hypot(a, b) + 1\n")


def test_execution_pass_fail_timeout_memory():
    assert execute_program("print('ok')").passed
    failed = execute_program("assert 1 == 2")
    assert failed.status == "failed" and "AssertionError" in failed.stderr
    assert execute_program("while True:\n    pass\n", timeout=1.0).status == "timeout"
    bomb = execute_program("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", memory_mb=256)
    assert bomb.status == "memory" and not bomb.passed


def test_execution_blocks_sockets_and_environment(monkeypatch):
    monkeypatch.setenv("RNC_TEST_SECRET", "hunter2")
    for isolate_network in (True, False):  # the guard holds even where unshare is not permitted
        program = "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n"
        result = execute_program(program, isolate_network=isolate_network)
        assert result.status == "failed" and "network access is disabled" in result.stderr
    env = execute_program("import os\nprint(dict(os.environ))\n")
    assert env.passed and "hunter2" not in env.stdout


@pytest.mark.skipif(not execution_module._unshare_command(), reason="no network namespaces on this machine")
def test_execution_network_namespace_stops_a_guard_bypass():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    # Re-importing _socket gets around the Python-level guard; the empty network namespace still has no route.
    bypass = (
        "import sys\nfor m in ('socket', '_socket'):\n    sys.modules.pop(m, None)\n"
        f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n"
    )
    result = execute_program(bypass, timeout=5.0)
    server.close()
    assert not result.passed and "connected" not in result.stdout and not accepted


# ------------------------------------------------------------------------------------------------------------ mixtures


def test_mixture_counts_weights_and_determinism():
    spec = [
        {"source": "arithmetic", "count": 25, "kwargs": {"size": 10}},  # cycles: 2 full passes + 5
        {"source": "reasoning", "weight": 0.5, "kwargs": {"size": 40}},
        {"source": "arc_easy", "weight": 2, "kwargs": {"source": fixture("arc_easy.jsonl")}},
    ]
    mix = TaskMixture(spec, seed=3)
    assert len(mix) == 25 + 20 + 8
    assert mix.counts() == {"arithmetic": 25, "reasoning": 20, "arc_easy": 8}
    assert list(mix) == list(TaskMixture(spec, seed=3))
    assert list(mix) != list(TaskMixture(spec, seed=4))
    assert len({mix.source_of(i) for i in range(15)}) == 3  # shuffled together, not one block per source
    # Sharding by slicing: ranks together see every example exactly once.
    shards = [TaskMixture(spec, seed=3, start=r, step=2) for r in range(2)]
    assert sorted(map(json.dumps, [c for s in shards for c in s])) == sorted(map(json.dumps, list(mix)))


def test_mixture_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown task source 'wiki'.*arc_easy"):
        TaskMixture([{"source": "wiki", "count": 1}])
    with pytest.raises(ValueError, match="exactly one of"):
        TaskMixture([{"source": "identity", "count": 1, "weight": 1.0}])
    with pytest.raises(ValueError, match="allowed"):
        TaskMixture([{"source": "identity", "count": 1, "seed": 3}])
    with pytest.raises(ValueError, match="count=-1"):
        TaskMixture([{"source": "identity", "count": -1}])
    with pytest.raises(ValueError, match="unknown mixture preset"):
        build_mixture("pretrain-huge")


def test_registry_has_the_documented_names():
    assert set(TASK_REGISTRY) == {
        "identity", "arithmetic", "spelling_bee", "reasoning", "smoltalk", "mmlu_aux", "gsm8k",
        "arc_easy", "arc_challenge", "mmlu", "humaneval",
    }  # fmt: skip


def test_cpu_presets_use_generated_sets_and_render(tokenizer):
    for name in ("mid-cpu", "sft-cpu"):
        assert {e["source"] for e in MIXTURE_PRESETS[name]} <= set(GENERATED)
        mix = build_mixture(name)
        assert len(mix) > 1000
        for conversation in TaskMixture(MIXTURE_PRESETS[name], start=0, step=len(mix) // 50):
            tokenizer.render_conversation(conversation)


def test_real_presets_build_from_hub_names(monkeypatch):
    import datasets

    files = {
        ("allenai/ai2_arc", "ARC-Easy"): "arc_easy.jsonl",
        ("allenai/ai2_arc", "ARC-Challenge"): "arc_challenge.jsonl",
        ("openai/gsm8k", "main"): "gsm8k.jsonl",
        ("HuggingFaceTB/smoltalk", "all"): "smoltalk.jsonl",
        ("cais/mmlu", "auxiliary_train"): "mmlu_aux.jsonl",
    }
    calls = []

    def fake_load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return load_rows(fixture(files[(name, subset)]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sft = build_mixture("sft-real")
    assert sft.counts()["smoltalk"] == 10_000 and sft.counts()["arc_easy"] == 4
    mid = build_mixture("mid-real")
    assert mid.counts()["mmlu_aux"] == 3 and mid.counts()["gsm8k"] == 3
    assert ("cais/mmlu", "auxiliary_train", "train") in calls and ("openai/gsm8k", "main", "train") in calls
    assert mid[0]["messages"] and sft[len(sft) - 1]["messages"]


# ------------------------------------------------------------------------------------------------------------- scoring


def test_centered_accuracy_and_chatcore():
    assert centered_accuracy(0.25, "categorical", 4) == 0.0
    assert centered_accuracy(1.0, "categorical", 4) == 1.0
    assert centered_accuracy(0.625, "categorical", 4) == pytest.approx(0.5)
    assert centered_accuracy(0.3, "generative") == 0.3
    with pytest.raises(ValueError, match="num_choices"):
        centered_accuracy(0.5, "categorical")
    with pytest.raises(ValueError, match="eval_type"):
        centered_accuracy(0.5, "multiple")
    results = {
        "ARC-Easy": {"accuracy": 0.625, "eval_type": "categorical", "num_choices": 4},
        "GSM8K": EvalResult("GSM8K", "generative", accuracy=0.1, num_correct=1, total=10),
    }
    assert chatcore(results) == pytest.approx(0.3)
    assert chatcore(list(results.values())) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------------------- runners


class CharTokenizer:
    """Fake tokenizer with the documented interface: one id per byte, specials after 256."""

    vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_special(self, name: str) -> int:
        return 256 + SPECIAL_TOKENS.index(name)

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) if i < 256 else SPECIAL_TOKENS[i - 256] for i in ids)

    def render_for_completion(self, conversation: dict) -> list[int]:
        ids = [self.encode_special("<|bos|>")]
        for m in conversation["messages"][:-1]:
            assert m["role"] == "user"
            ids += [
                self.encode_special("<|user_start|>"),
                *self.encode(m["content"]),
                self.encode_special("<|user_end|>"),
            ]
        return ids + [self.encode_special("<|assistant_start|>")]


class OracleModel:
    """Fake GPT: at the answer position it favours a target letter; everywhere else a decoy letter."""

    def __init__(self, tokenizer: CharTokenizer, targets: dict[tuple[int, ...], tuple[int, int]]):
        self.tokenizer, self.targets, self.num_recurs = tokenizer, targets, []

    def __call__(self, idx: torch.Tensor, targets=None, num_recur=None) -> torch.Tensor:
        self.num_recurs.append(num_recur)
        logits = torch.zeros(*idx.shape, self.tokenizer.vocab_size)
        pad = self.tokenizer.encode_special("<|assistant_end|>")
        for b, row in enumerate(idx.tolist()):
            while row[-1] == pad:
                row.pop()
            target, decoy = self.targets[tuple(row)]
            logits[b, :, decoy] = 10.0
            logits[b, len(row) - 1, decoy] = 0.0
            logits[b, len(row) - 1, target] = 20.0
        return logits


def _oracle_targets(task, tokenizer, right) -> dict[tuple[int, ...], tuple[int, int]]:
    targets = {}
    for i, conversation in enumerate(task):
        letters, answer = conversation["letters"], conversation["messages"][-1]["content"]
        wrong = next(x for x in letters if x != answer)
        target = answer if right(i) else wrong
        decoy = next(x for x in letters if x not in (target, answer)) if right(i) else answer
        targets[tuple(tokenizer.render_for_completion(conversation))] = (ord(target), ord(decoy))
    return targets


@pytest.mark.parametrize("source", ["mmlu", "arc_easy"])
def test_run_categorical_reads_the_letter_logits_after_the_prompt(source):
    tokenizer = CharTokenizer()
    task = build_task(source, source=fixture(f"{source}.jsonl"))
    model = OracleModel(tokenizer, _oracle_targets(task, tokenizer, right=lambda i: i % 2 == 0))
    result = run_categorical(model, tokenizer, task, num_recur=3, batch_size=3)
    assert (result.accuracy, result.num_correct, result.total, result.num_choices) == (0.5, 2, 4, 4)
    assert model.num_recurs == [3, 3]  # two batches, num_recur passed through
    everything = OracleModel(tokenizer, _oracle_targets(task, tokenizer, right=lambda i: True))
    assert run_categorical(everything, tokenizer, task, batch_size=8).accuracy == 1.0
    with pytest.raises(ValueError, match="categorical"):
        run_categorical(model, tokenizer, Reasoning(size=2), num_recur=1)


class HalfRightEngine:
    """Fake Engine: generate_batch answers even-numbered items right; recurrences alternate 2 and 4."""

    def __init__(self, answers: dict[tuple[int, ...], tuple[int, str]]):
        self.answers, self.calls = answers, []

    def generate_batch(self, prompts, **kwargs):
        self.calls.append(kwargs)
        results = []
        for prompt in prompts:
            index, answer = self.answers[tuple(prompt)]
            text = answer if index % 2 == 0 else "wrong"
            results.append(SimpleNamespace(tokens=[1, 2], recurs=[2, 4], text=text))
        return results


def test_run_generative_accuracy_and_mean_recurrences():
    tokenizer = CharTokenizer()
    task = Reasoning("chain", "eval", size=10)
    answers = {tuple(tokenizer.render_for_completion(c)): (i, c["messages"][-1]["content"]) for i, c in enumerate(task)}
    engine = HalfRightEngine(answers)
    result = run_generative(
        engine, tokenizer, task, num_recur=4, max_tokens=8, exit=ExitRule(criterion="kl", threshold=0.01),
        batch_size=4, kv_cache="exact",
    )  # fmt: skip
    assert result.accuracy == 0.5 and result.num_correct == 5 and result.total == 10
    assert result.mean_recur == 3.0 and result.tokens_generated == 20
    assert len(engine.calls) == 3
    call = engine.calls[0]
    assert (call["num_recur"], call["max_tokens"], call["exit"]) == (4, 8, ExitRule(criterion="kl", threshold=0.01))
    assert call["temperature"] == 0.0 and call["kv_cache"] == "exact"
    assert run_generative(engine, tokenizer, task, max_problems=2).total == 2
    # Without a rule, exit=None is passed on explicitly: an exit rule in the checkpoint's config must not apply.
    assert "exit" in engine.calls[-1] and engine.calls[-1]["exit"] is None
    with pytest.raises(ValueError, match="generative"):
        run_generative(engine, tokenizer, MMLU(source=fixture("mmlu.jsonl")))
