"""Score a model on eval tasks x recurrences: the table, plot and report card behind `rnc eval` (no Ray, no S3).

    rule = ExitRule.parse("kl:5e-4")
    report = evaluate_model(model, tokenizer, ["reasoning", "arc_easy"], [1, 2, 4, 8], adaptive=rule)
    write_outputs(report, "out/", baseline=plain_gpt_report)  # eval.json, eval.md, eval.png, report_card.md

Every task is scored at every r: categorical tasks by the answer-letter logits (`run_categorical`), generative tasks
by greedy decoding (`run_generative`). With an adaptive `ExitRule` (`kl:5e-4`, `latent:1e-3`) the generative tasks
are decoded once more at max r with that rule, recording the recurrences each generated token actually used.
ChatCORE (nanochat) is the mean centred accuracy over the evaluated tasks, per r.

A plain GPT (n_recur = 0) ignores r: it is evaluated once and that result fills every requested r, so the report
keeps one schema (every task x every r) for recursive models and baselines alike.

Modules: `registry` (the tasks by name), `arguments` (r list and adaptive rule), `loop` (evaluate_model), `report`
(EvalReport: JSON, markdown, plot), `report_card` (the files written and read back).
"""

from .arguments import check_adaptive, check_recurrences
from .loop import evaluate_model, model_summary
from .registry import EVAL_TASKS, EvalTaskSpec, build_eval_tasks, check_task_names
from .report import ADAPTIVE, EvalReport
from .report_card import OUTPUT_FILES, load_report, write_outputs

__all__ = [
    "ADAPTIVE",
    "EVAL_TASKS",
    "OUTPUT_FILES",
    "EvalReport",
    "EvalTaskSpec",
    "build_eval_tasks",
    "check_adaptive",
    "check_recurrences",
    "check_task_names",
    "evaluate_model",
    "load_report",
    "model_summary",
    "write_outputs",
]
