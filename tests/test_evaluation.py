"""`rnc eval` end to end on tiny checkpoints (local and S3), its one-line errors, and the report's table and ChatCORE.

The checkpoints are random-init `tiny` models with a tokenizer trained in milliseconds: the numbers are noise, the
tests check that every task x every r is scored, reported, plotted and carried into the report card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from checkpoints import Storage, save_checkpoint
from pipelines.eval_cli import add_eval_subcommand, main
from recursive_model import GPT, GPTConfig, Tokenizer
from recursive_model.evaluation import (
    ADAPTIVE,
    EVAL_TASKS,
    EvalReport,
    build_eval_tasks,
    evaluate_model,
    load_report,
    write_outputs,
)
from recursive_model.recurrence import ExitRule
from recursive_model.tasks import EvalResult, Reasoning

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCES = {"arc_easy": str(FIXTURES / "arc_easy.jsonl"), "gsm8k": str(FIXTURES / "gsm8k.jsonl")}
SOURCE_ARGS = [arg for name, path in SOURCES.items() for arg in ("--task-source", f"{name}={path}")]
FAST = ["--max-problems", "4", "--max-tokens", "6", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [Reasoning(split="train", size=50)[i]["messages"][0]["content"] for i in range(50)]
    texts += ["Multiple Choice question: which? - red=A - blue=B - green=C - gray=D. The answer is #### 42."] * 5
    return Tokenizer.train(iter(texts), vocab_size=320)


def _model(tokenizer: Tokenizer, **overrides: object) -> tuple[GPT, GPTConfig]:
    torch.manual_seed(0)
    # A 256-token context: ARC prompts are ~130 tokens with a tokenizer this small.
    config = GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, sequence_len=256, **overrides)
    return GPT(config), config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> SimpleNamespace:
    """A recursive tiny checkpoint and its iso-depth plain-GPT baseline (6 layers = 1 + 2 * 2 + 1 at r=2)."""
    root = tmp_path_factory.mktemp("ckpt")
    model, config = _model(tokenizer)
    save_checkpoint(root / "recursive", model, config, tokenizer, {"stage": "sft", "step": 6})
    plain, plain_config = _model(tokenizer, n_prelude=4, n_recur=0, n_coda=2)
    save_checkpoint(root / "plain", plain, plain_config, tokenizer, {"stage": "sft", "step": 6})
    return SimpleNamespace(recursive=str(root / "recursive"), plain=str(root / "plain"), root=root)


def _table_rows(markdown: str) -> list[list[str]]:
    """Cells of the first markdown table."""
    rows, started = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif started:
            break
    return rows


# --------------------------------------------------------------------------------------------------- end to end


def test_cli_end_to_end_with_adaptive_and_baseline(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", checkpoints.recursive, "--recurrences", "2,1", "--tasks", "reasoning,arc_easy,gsm8k"]
    argv += ["--adaptive", "kl:5e-4", "--baseline", checkpoints.plain, "--out", str(out), *SOURCE_ARGS, *FAST]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "[eval] reasoning" in stdout and "r=2" in stdout and "acc " in stdout  # progress as it goes
    assert str(out / "report_card.md") in stdout  # where the outputs went

    data = json.loads((out / "eval.json").read_text())
    tasks = ["reasoning", "arc_easy", "gsm8k"]
    assert data["tasks"] == tasks and data["recurrences"] == [1, 2]
    assert {t: sorted(by_r) for t, by_r in data["results"].items()} == {t: ["1", "2"] for t in tasks}
    assert all(data["results"][t][r]["total"] == (3 if t == "gsm8k" else 4) for t in tasks for r in ("1", "2"))
    assert set(data["chatcore"]) == {"1", "2", ADAPTIVE}
    assert data["adaptive"] == "kl:0.0005" and data["adaptive_recur"] == 2
    assert set(data["adaptive_results"]) == set(tasks)
    for task in ("reasoning", "gsm8k"):  # generative: recurrences actually used, within the budget
        assert 1.0 <= data["adaptive_results"][task]["mean_recur"] <= 2.0
    assert 1.0 <= data["mean_recur"][ADAPTIVE] <= 2.0
    assert data["mean_recur"]["1"] == 1.0 and data["mean_recur"]["2"] == 2.0
    assert data["baseline"]["recursive"] is False and set(data["baseline"]["results"]) == set(tasks)
    assert data["model"]["effective_depth"] == {"1": 4, "2": 6} and data["meta"]["step"] == 6

    rows = _table_rows((out / "eval.md").read_text())
    assert rows[0][:4] == ["task", "type", "r=1", "r=2"]
    assert rows[0][4].startswith("adaptive kl:0.0005") and rows[0][5] == "baseline"
    assert [row[0] for row in rows[2:]] == [*tasks, "**ChatCORE**", "recurrences / generated token"]
    assert {len(row) for row in rows} == {6}
    assert "r/tok" in rows[2][4]  # the adaptive cell of a generative task reports its recurrences

    png = (out / "eval.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000

    card = (out / "report_card.md").read_text()
    assert card.startswith(f"# Report card: {checkpoints.recursive}")
    assert "| r=1 | r=2 |" in card and "![score vs recurrences](eval.png)" in card
    assert "## Adaptive exit" in card and "effective depth" in card and "plain GPT, 6 layers" in card
    report, baseline = load_report(out / "eval.json")
    assert report.chatcore(2) == pytest.approx(data["chatcore"]["2"]) and baseline is not None


def test_cli_without_adaptive_keeps_every_r(checkpoints, tmp_path, capsys):
    out = tmp_path / "plain-run"
    argv = ["--checkpoint", checkpoints.recursive, "--recurrences", "1,2,4", "--tasks", "reasoning,reasoning_hard"]
    assert main([*argv, "--out", str(out), *FAST]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["adaptive"] is None and data["adaptive_results"] == {} and "baseline" not in data
    assert all(sorted(by_r, key=int) == ["1", "2", "4"] for by_r in data["results"].values())
    assert data["task_names"] == {"reasoning": "Reasoning-pointer-eval", "reasoning_hard": "Reasoning-pointer-hard"}
    rows = _table_rows((out / "eval.md").read_text())
    assert rows[0] == ["task", "type", "r=1", "r=2", "r=4"]
    assert rows[-2][0] == "**ChatCORE**" and rows[-1][2:] == ["1.00", "2.00", "4.00"]
    card = (out / "report_card.md").read_text()
    assert "## Adaptive exit" not in card and "| r=1 | r=2 | r=4 |" in card


def test_cli_reads_a_checkpoint_from_s3_and_writes_outputs_there(checkpoints, s3_bucket, capsys):
    storage = Storage(s3_bucket.config())
    storage.upload_dir(checkpoints.recursive, storage.join("run", "sft"))
    argv = ["--checkpoint", f"{s3_bucket.uri}/run/sft", "--storage-endpoint", s3_bucket.endpoint_url]
    argv += ["--recurrences", "1,2", "--tasks", "reasoning", "--out", f"{s3_bucket.uri}/run/eval", *FAST]
    assert main(argv) == 0
    assert f"{s3_bucket.uri}/run/eval/report_card.md" in capsys.readouterr().out
    data = storage.read_json(storage.join("run", "eval", "eval.json"))
    assert data["checkpoint"] == f"{s3_bucket.uri}/run/sft" and sorted(data["results"]["reasoning"]) == ["1", "2"]
    assert storage.exists(storage.join("run", "eval", "eval.png"))


# ------------------------------------------------------------------------------------------------------ bad input


def _corrupt(root: Path, source: str) -> str:
    """A copy of a checkpoint with one flipped byte in its weights."""
    import shutil

    target = root / "corrupt"
    if not target.exists():
        shutil.copytree(source, target)
        weights = target / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    return str(target)


BAD_INPUTS = [
    # (case, extra argv or a builder of the full argv, exit code, fragment of the message)
    ("unknown task", ["--tasks", "reasoning,wiki"], 2, "unknown task 'wiki'; known: reasoning"),
    ("r = 0", ["--recurrences", "1,0"], 2, "r=0 is invalid"),
    ("r not an int", ["--recurrences", "1,two"], 2, "r='two' is not an integer"),
    ("adaptive without threshold", ["--adaptive", "kl"], 2,
     "argument --adaptive: exit rule 'kl' is not criterion:threshold[:min_recur]; "
     "criteria ['kl', 'latent', 'learned']"),
    ("adaptive unknown criterion", ["--adaptive", "entropy:1e-3"], 2,
     "argument --adaptive: ExitRule.criterion='entropy' is invalid; allowed one of ['kl', 'latent', 'learned']"),
    ("adaptive threshold < 0", ["--adaptive", "latent:-1"], 2,
     "argument --adaptive: ExitRule.threshold=-1.0 is invalid; allowed a number >= 0"),
    ("source for a generated task", ["--task-source", "reasoning=x.jsonl"], 2, "'reasoning' is generated"),
    ("missing task source", ["--tasks", "gsm8k", "--task-source", "gsm8k=/no/such.jsonl"], 2, "/no/such.jsonl"),
    ("bad max problems", ["--max-problems", "0"], 2, "argument --max-problems: '0' must be an integer >= 1"),
]


@pytest.mark.parametrize(("case", "extra", "code", "fragment"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_arguments_give_one_line_and_exit_2(checkpoints, capsys, case, extra, code, fragment):
    argv = ["--checkpoint", checkpoints.recursive, "--recurrences", "1,2", *extra]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rnc eval: error: ") and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize(
    ("case", "code", "fragment"),
    [
        ("missing", 1, "no such directory"),
        ("not a checkpoint", 1, "manifest.json missing"),
        ("corrupt", 1, "model.safetensors: sha256 mismatch"),
        ("adaptive on a plain GPT", 2, "needs a recursive model"),
        ("no checkpoint argument", 2, "--checkpoint"),
    ],
)
def test_unreadable_checkpoints_give_one_line(checkpoints, tmp_path, capsys, case, code, fragment):
    uri = {
        "missing": str(tmp_path / "nope"),
        "not a checkpoint": str(tmp_path),
        "corrupt": _corrupt(checkpoints.root, checkpoints.recursive),
        "adaptive on a plain GPT": checkpoints.plain,
    }.get(case)
    argv = ["--recurrences", "1", "--tasks", "reasoning", "--out", str(tmp_path / "out"), *FAST]
    argv += ["--checkpoint", uri] if uri else []
    argv += ["--adaptive", "kl:1e-3"] if case == "adaptive on a plain GPT" else []
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rnc eval: error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_add_eval_subcommand_registers_eval_on_rnc(checkpoints, capsys):
    parser = argparse.ArgumentParser(prog="rnc")
    add_eval_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--checkpoint", checkpoints.recursive, "--recurrences", "4,1"])
    assert args.recurrences == [1, 4] and args.tasks == ["walk", "walk_hard", "arithmetic", "spelling_bee"]
    assert callable(args.func)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["eval", "--checkpoint", checkpoints.recursive, "--recurrences", "-2"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "rnc eval: error: argument --recurrences: recurrence r=-2 is invalid: every r must be an integer >= 1\n"
    )


# ---------------------------------------------------------------------------------------------- evaluate_model


def test_evaluate_model_validates_its_inputs(tokenizer):
    model, _ = _model(tokenizer)
    cases = [
        (dict(tasks=["nope"]), "unknown task 'nope'; known: reasoning, reasoning_hard"),
        (dict(tasks=[]), "non-empty list of task names"),
        (dict(recurrences=[2, 0]), "r=0 is invalid"),
        (dict(recurrences=[]), "non-empty list"),
        (dict(adaptive="kl:5e-4"), "adaptive='kl:5e-4' must be an ExitRule or None; parse a spec"),
        (dict(max_problems=0), "max_problems=0"),
        (dict(sources={"wiki": "x.jsonl"}), "source given for unknown task 'wiki'"),
    ]
    for overrides, message in cases:
        kwargs = dict(tasks=["reasoning"], recurrences=[1], log=None) | overrides
        with pytest.raises(ValueError, match=message):
            evaluate_model(model, tokenizer, **kwargs)


def test_eval_tasks_build_eval_splits_and_hub_tasks_read_local_sources():
    sources = {name: str(FIXTURES / f"{name}.jsonl") for name, spec in EVAL_TASKS.items() if spec.hub}
    tasks = build_eval_tasks(list(EVAL_TASKS), sources)
    assert list(tasks) == list(EVAL_TASKS)
    assert tasks["reasoning"].split == "eval" and tasks["reasoning_hard"].split == "hard"
    assert tasks["reasoning_hard"].difficulty[0] > tasks["reasoning"].difficulty[1]  # beyond training difficulty
    assert tasks["arithmetic"].split == "eval" and tasks["spelling_bee"].split == "eval"
    assert {n: t.eval_type for n, t in tasks.items() if t.eval_type == "categorical"} == dict.fromkeys(
        ["arc_easy", "arc_challenge", "mmlu"], "categorical"
    )
    assert tasks["arc_challenge"].name == "ARC-Challenge" and len(tasks["humaneval"]) == 3


def test_prompts_longer_than_the_context_are_scored_wrong_not_fatal(tokenizer):
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))  # 64-token context
    report = evaluate_model(model, tokenizer, ["arc_easy", "reasoning"], [1], max_problems=4, max_tokens=4,
                            sources=SOURCES, log=None)  # fmt: skip
    arc = report.results["arc_easy"][1]
    assert (report.too_long["arc_easy"], arc.total, arc.num_correct, arc.accuracy) == (4, 4, 0, 0.0)
    assert report.too_long["reasoning"] == 0 and report.results["reasoning"][1].total == 4
    assert "arc_easy: 4 prompt(s) longer than the 64-token context" in report.to_markdown()


def test_plain_gpt_is_scored_once_for_every_r(tokenizer, capsys):
    plain, _ = _model(tokenizer, n_prelude=2, n_recur=0, n_coda=1)
    report = evaluate_model(plain, tokenizer, ["reasoning"], [1, 2, 4], max_problems=2, max_tokens=3)
    assert not report.recursive and list(report.seconds["reasoning"]) == ["r=1"]  # one evaluation
    assert report.results["reasoning"][1] is report.results["reasoning"][4]
    assert capsys.readouterr().out.count("[eval] reasoning") == 1
    assert "Plain GPT (no recurrent block): r has no effect" in report.to_markdown()


def test_fixed_r_columns_ignore_an_exit_criterion_in_the_checkpoint_config(tokenizer):
    # A threshold no KL can reach: with the config's criterion on, every token would exit after 2 recurrences.
    model, _ = _model(tokenizer, decode=dict(num_recur=2, exit=ExitRule(criterion="kl", threshold=1e9)))
    report = evaluate_model(model, tokenizer, ["reasoning"], [4], adaptive=ExitRule.parse("kl:1e9"), max_problems=2,
                            max_tokens=3, log=None)  # fmt: skip
    assert report.results["reasoning"][4].mean_recur == 4.0
    # Per answer: every token exits at the first KL check (2), the first too (the last prompt token follows the rule).
    assert report.adaptive_results["reasoning"].mean_recur == pytest.approx(2.0)


def test_walk_results_break_down_by_moves_and_the_report_card_shows_them(tokenizer, tmp_path):
    """Per difficulty: problems, accuracy and recurrences per token add up to the task's totals (adaptive and fixed),
    and the report card lists them under the adaptive section."""
    model, _ = _model(tokenizer)
    report = evaluate_model(model, tokenizer, ["walk", "walk_hard"], [1, 3], adaptive=ExitRule.parse("latent:0.05"),
                            max_problems=12, max_tokens=3, log=None)  # fmt: skip
    assert EVAL_TASKS["walk_hard"].build().split == "hard"
    for task, (lo, hi) in (("walk", (2, 4)), ("walk_hard", (5, 8))):
        for result in (report.results[task][3], report.adaptive_results[task]):
            levels = result.by_difficulty
            assert set(map(int, levels)) <= set(range(lo, hi + 1)) and levels
            assert sum(v["total"] for v in levels.values()) == result.total == 12
            assert sum(v["num_correct"] for v in levels.values()) == result.num_correct
            assert all(v["accuracy"] == v["num_correct"] / v["total"] for v in levels.values())
        adaptive = report.adaptive_results[task].by_difficulty
        tokens = report.adaptive_results[task].tokens_generated
        total_recur = report.adaptive_results[task].mean_recur * tokens
        # each level's mean is over its own tokens: weighted back, they give the task's mean
        assert all(1 <= v["mean_recur"] <= 3 for v in adaptive.values())
        assert sum(v["tokens_generated"] for v in adaptive.values()) == tokens
        assert sum(v["mean_recur"] * v["tokens_generated"] for v in adaptive.values()) == pytest.approx(total_recur)
        assert all(v["mean_recur"] == 3.0 for v in report.results[task][3].by_difficulty.values())
    assert EvalReport.from_json(report.to_json()) == report
    # one-token answers: the exit per problem over the whole prompt (evaluation.depth); arithmetic's are longer
    assert set(report.depth_results) == {"walk", "walk_hard"}
    for task in ("walk", "walk_hard"):
        depth = report.depth_results[task]
        assert depth.total == 12 and 1 <= depth.mean_recur <= 3
        assert sum(v["total"] for v in depth.by_difficulty.values()) == 12
    card = write_outputs(report, tmp_path)["report_card"].read_text()
    assert "Adaptive depth per problem" in card
    rows = [line for line in card.splitlines() if line.startswith("| walk")]
    levels = {(row.split("|")[1].strip(), row.split("|")[2].strip()) for row in rows}
    assert ("walk", "2") in levels and any(task == "walk_hard" for task, _ in levels)


def test_answer_depth_equals_the_full_forward_at_every_r_and_exits_as_the_rules_say(tokenizer):
    from recursive_model.evaluation.depth import answer_depth

    model, _ = _model(tokenizer)
    model = model.double().eval()
    task = Reasoning("walk", "hard", size=10)
    rules = [ExitRule.parse("kl:1e9"), ExitRule.parse("latent:1e9"), ExitRule.parse("latent:1e9:3"),
             ExitRule.parse("kl:0")]
    depth = answer_depth(model, tokenizer, task, 4, rules, batch_size=4)
    for r in range(1, 5):  # the argmax after r recurrences of one forward == a forward at num_recur=r, per prompt
        for i in range(10):
            ids = torch.tensor([tokenizer.render_for_completion(task[i])])
            want = tokenizer.encode(task[i]["messages"][-1]["content"])[0]
            with torch.no_grad():
                assert bool(depth.correct_at[r][i]) == (int(model(ids, num_recur=r)[0, -1].argmax()) == want)
    # kl needs two distributions (fires at 2 at the earliest), latent fires at once, min_recur holds, 0 never fires
    assert depth.exit_at[rules[0]].tolist() == [2] * 10 and depth.exit_at[rules[1]].tolist() == [1] * 10
    assert depth.exit_at[rules[2]].tolist() == [3] * 10 and depth.exit_at[rules[3]].tolist() == [4] * 10
    result = depth.result(rules[1], "walk_hard")
    assert result.mean_recur == 1.0 and result.accuracy == float(depth.correct_at[1].float().mean())


# ------------------------------------------------------------------------------------------------------- report


def _result(task: str, eval_type: str, correct: int, total: int, r: int, **kw: object) -> EvalResult:
    choices = 4 if eval_type == "categorical" else None
    return EvalResult(task, eval_type, correct / total, correct, total, num_choices=choices, num_recur=r, **kw)


def _hand_report() -> EvalReport:
    """ARC: 5/8 then 7/8 correct; GSM8K: 1/10 then 3/10 with 20 generated tokens; adaptive at r=4."""
    return EvalReport(
        tasks=["arc_easy", "gsm8k"],
        recurrences=[1, 4],
        results={
            "arc_easy": {
                1: _result("ARC-Easy", "categorical", 5, 8, 1),
                4: _result("ARC-Easy", "categorical", 7, 8, 4),
            },
            "gsm8k": {
                1: _result("GSM8K", "generative", 1, 10, 1, mean_recur=1.0, tokens_generated=20),
                4: _result("GSM8K", "generative", 3, 10, 4, mean_recur=4.0, tokens_generated=20),
            },
        },
        adaptive=ExitRule(criterion="latent", threshold=1e-3),
        adaptive_results={
            "arc_easy": _result("ARC-Easy", "categorical", 7, 8, 4),
            "gsm8k": _result("GSM8K", "generative", 2, 10, 4, mean_recur=2.5, tokens_generated=40),
        },
        settings={"max_problems": 10, "max_tokens": 32},
    )


def test_chatcore_per_column_is_the_mean_centred_accuracy():
    report = _hand_report()
    # ARC 5/8 centred on chance 1/4 -> 0.5; GSM8K 0.1 (chance 0): ChatCORE 0.3.
    assert report.chatcore(1) == pytest.approx((0.5 + 0.1) / 2)
    assert report.chatcore(4) == pytest.approx(((7 / 8 - 0.25) / 0.75 + 0.3) / 2)
    assert report.chatcore(ADAPTIVE) == pytest.approx(((7 / 8 - 0.25) / 0.75 + 0.2) / 2)
    assert report.mean_recur(ADAPTIVE) == 2.5 and report.mean_recur(4) == 4.0
    rows = _table_rows(report.to_markdown())
    assert rows[-2] == ["**ChatCORE**", "", "**0.300**", "**0.567**", "**0.517**"]
    assert rows[-1] == ["recurrences / generated token", "", "1.00", "4.00", "2.50"]


def test_markdown_table_has_a_column_per_r_and_a_row_per_task():
    report = _hand_report()
    rows = _table_rows(report.to_markdown(baseline=report))
    assert rows[0] == ["task", "type", "r=1", "r=4", "adaptive latent:0.001 (r≤4)", "baseline"]
    assert rows[1] == [":--", ":--", "--:", "--:", "--:", "--:"]
    assert [row[0] for row in rows[2:]] == ["arc_easy", "gsm8k", "**ChatCORE**", "recurrences / generated token"]
    assert {len(row) for row in rows} == {6}
    assert rows[2][2:] == ["0.625 (5/8)", "0.875 (7/8)", "0.875 (7/8), r=4", "0.625 (5/8)"]
    assert rows[3][4] == "0.200 (2/10), 2.50 r/tok"


def test_report_round_trips_and_report_card_keeps_extra_sections(tmp_path):
    report = _hand_report()
    assert EvalReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="no result for gsm8k@r=4"):
        EvalReport(tasks=["gsm8k"], recurrences=[1, 4], results={"gsm8k": {1: report.results["gsm8k"][1]}})
    sections = {"Training: pretrain": "| step | loss |\n|--:|--:|\n| 10 | 3.2 |", "Training: sft": "loss 1.9"}
    paths = write_outputs(report, tmp_path, baseline=report, title="Run tiny", extra_sections=sections)
    assert {p.name for p in paths.values()} == {"eval.json", "eval.md", "eval.png", "report_card.md"}
    card = paths["report_card"].read_text()
    assert card.startswith("# Run tiny\n")
    assert card.index("## Evaluation") < card.index("## Adaptive exit") < card.index("## Training: pretrain")
    assert card.index("## Training: pretrain") < card.index("## Training: sft") and "| 10 | 3.2 |" in card
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)
