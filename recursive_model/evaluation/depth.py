"""Adaptive depth per problem: one forward over each prompt, the exit rule checked at the answer position after every
recurrence, and the whole prompt counted at the recurrence where the rule fires.

The engine's adaptive column counts the recurrences of generated tokens while the prompt runs the full budget. For a
one-token answer (a walk's digit) all the work is in the prompt, so that column cannot show whether harder problems
get more depth; this measure can: how deep the whole forward has to go before the answer's distribution settles (what
a prefill that stops at the exit would spend). It needs answers of one token, whose correctness is the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import GPT
from ..recurrence import EXIT_CRITERIA, ExitRule
from ..tasks import EvalResult, Task
from ..tokenizer import Tokenizer


@dataclass
class AnswerDepth:
    """Per problem: is the answer token right after r recurrences, and where does each exit rule fire."""

    correct_at: dict[int, torch.Tensor]  # r -> (N,) bool, for r = 1..r_max
    exit_at: dict[ExitRule, torch.Tensor]  # rule -> (N,) long: the recurrence it fires at (r_max when it never does)
    difficulty: list[int | None]  # the problem's "difficulty" (hops, moves), None when the task gives none

    def result(self, rule: ExitRule, task: str) -> EvalResult:
        """The problems scored at the recurrence where `rule` fires: accuracy, mean depth, both per difficulty."""
        exit_at = self.exit_at[rule]
        right = torch.stack([self.correct_at[int(r)][i] for i, r in enumerate(exit_at)])
        levels: dict[str, dict[str, float]] = {}
        for level in sorted({d for d in self.difficulty if d is not None}):
            rows = torch.tensor([d == level for d in self.difficulty])
            n, k = int(rows.sum()), int(right[rows].sum())
            levels[str(level)] = {"total": n, "num_correct": k, "accuracy": k / n,
                                  "mean_recur": float(exit_at[rows].float().mean()), "tokens_generated": n}
        n, k = len(exit_at), int(right.sum())
        return EvalResult(task=task, eval_type="generative", accuracy=k / n if n else 0.0, num_correct=k, total=n,
                          num_recur=len(self.correct_at), mean_recur=float(exit_at.float().mean()) if n else None,
                          tokens_generated=n, by_difficulty=levels or None)


def one_token_answers(task: Task, tokenizer: Tokenizer, max_problems: int | None = None) -> bool:
    """True if every answer (the last assistant message) of the first `max_problems` problems is one token of text."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    answers = [task[i]["messages"][-1]["content"] for i in range(n)]  # a tool-using answer is a list of parts
    return n > 0 and all(isinstance(a, str) and len(tokenizer.encode(a)) == 1 for a in answers)


@torch.no_grad()
def answer_depth(model: GPT, tokenizer: Tokenizer, task: Task, r_max: int, rules: Sequence[ExitRule],
                 max_problems: int | None = None, batch_size: int = 64) -> AnswerDepth:
    """One forward to `r_max` per batch of prompts gives the answer token's argmax after every r, and where each exit
    rule fires at the answer position (as the engine decides it for a decoded token: the same criteria, thresholds,
    min_recur, and no logit rule before the second recurrence)."""
    if not model.config.is_recursive:
        raise ValueError("answer_depth needs a recurrent block (n_recur >= 1)")
    n = len(task) if max_problems is None else min(len(task), max_problems)
    if any(EXIT_CRITERIA[rule.criterion].uses_gate for rule in rules) and model.exit_gate is None:
        raise ValueError("exit criterion 'learned' needs a model with an exit gate (GPTConfig.exit_gate=true)")
    device = next(model.parameters()).device
    correct = {r: [] for r in range(1, r_max + 1)}
    exits: dict[ExitRule, list[torch.Tensor]] = {rule: [] for rule in rules}
    difficulty: list[int | None] = []
    for start in range(0, n, batch_size):
        conversations = [task[i] for i in range(start, min(start + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        answers = [tokenizer.encode(c["messages"][-1]["content"]) for c in conversations]
        if any(len(a) != 1 for a in answers):
            raise ValueError(f"{task.name}: answer_depth needs answers of one token")
        difficulty += [c.get("difficulty") for c in conversations]
        x = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            x[b, : len(p)] = torch.tensor(p)  # right-padded: causal attention never sees the padding
        rows = torch.arange(len(prompts), device=device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        y = torch.tensor([a[0] for a in answers], device=device)
        fired = {rule: torch.zeros(len(prompts), dtype=torch.bool, device=device) for rule in rules}
        exit_at = {rule: torch.full((len(prompts),), r_max, device=device) for rule in rules}
        # s0 of the answer token: what the first recurrence's change is measured against (as in the engine)
        s_prev, logp_prev = model.initial_state(model._prelude(x)[0])[rows, last], None
        for r, state, logits in model.iterate(x, r_max):
            s_new, logp_new = state[rows, last], logits[rows, last].float().log_softmax(-1)
            correct[r].append((logp_new.argmax(-1) == y).cpu())
            gate = model.gate_prob(s_new) if model.exit_gate is not None else None
            for rule in rules:
                crit = EXIT_CRITERIA[rule.criterion]
                fire = crit.converged(s_prev, s_new, logp_prev, logp_new,
                                      torch.full((len(prompts),), rule.threshold, device=device), gate)
                fire = fire & ~fired[rule] & (r >= rule.min_recur)
                if crit.uses_logits and logp_prev is None:
                    fire[:] = False  # a change of distribution needs two recurrences
                exit_at[rule][fire] = r
                fired[rule] |= fire
            s_prev, logp_prev = s_new, logp_new
        for rule in rules:
            exits[rule].append(exit_at[rule].cpu())
    return AnswerDepth({r: torch.cat(v) for r, v in correct.items()}, {k: torch.cat(v) for k, v in exits.items()},
                       difficulty)
