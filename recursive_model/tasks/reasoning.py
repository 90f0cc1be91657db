"""CPU-scale reasoning tasks where more recurrences should help: pointer chasing, variable tracking, operand sums.

  pointer, difficulty 2: user "q=c;c=4;t=8;x=t;d=q;...;d?"  assistant "4"    (d -> q -> c -> 4)
  chain,   difficulty 3: user "k=7;d=k+5;w=d-3;z=w+2;z?"    assistant "11"
  sum,     difficulty 3: user "3+5+2+7=?"                   assistant "17"
  walk,    difficulty 3: user "7;c;a;d?"                    assistant "2"     (7 -c-> 4 -a-> 9 -d-> 2)

Difficulty is the number of hops (pointer: copies to follow; chain: derived assignments; sum: additions).
`pointer` is the depth task: every prompt holds POINTER_STATEMENTS statements in three disjoint chains (the asked
one and two distractors), each ending in a distinct digit, so one hop is one lookup, answers are always 0-9 at every
difficulty (the hard split tests depth, not unseen outputs) and the length does not grow with difficulty. Once the
pointer reaches the digit, further hops keep it there: the answer is a fixed point of the recurrence.
`walk` is state tracking: a digit is moved by each letter in turn, each letter a fixed permutation of the ten
digits (WALK_MOVES, learned from the data). The moves do not commute, so the answer can only be had by composing
them in order: a fixed-depth network composes about one move per layer, while a recurrent block that applies one
move per recurrence (each move's position reads the digit reached at the previous move's) solves longer walks with
more recurrences. A hop is one move; answers are uniform over 0-9 at every difficulty.
The answer is one short number and there is no chain of thought, so the work has to happen in depth, i.e. in the
recurrences. With `state_targets` a training walk also names the digit after each move as a target of the prompt
position that reads the move (intermediate targets, never part of the input). Splits:
  train  difficulty 1-4, any seed, any size;
  eval   difficulty 1-4, a fixed held-out set (EVAL_SIZE problems, seed fixed; walk: 2-4, see is_held_out);
  hard   difficulty 5-8, a fixed held-out set beyond the training difficulty, to test whether more test-time
         recurrences extrapolate.
Held-out problems are disjoint from training problems by construction, not only by seed: a problem belongs to the
held-out side iff a stable hash of its prompt is 0 mod HELDOUT_MOD, and each split rejection-samples its own side.
Prompts stay within PROMPT_MAX_BYTES so that, with the chat special tokens, a prompt is < 64 tokens for any
byte-level BPE tokenizer (a token covers at least one byte).
"""

from __future__ import annotations

import random
import re
from typing import Any

from recursive_model.tasks.base import (
    Conversation,
    EvalType,
    Task,
    check_choice,
    example_rng,
    extract_final_answer,
    stable_hash,
    strip_special,
)

KINDS = ("pointer", "chain", "sum", "walk")
ORDERS = ("forward", "shuffled")
REASONING_SPLITS = ("train", "eval", "hard")
TRAIN_DIFFICULTY = (1, 4)
HARD_DIFFICULTY = (5, 8)
POINTER_STATEMENTS = 12  # statements per pointer prompt: 12 * 4 bytes + the query stay under PROMPT_MAX_BYTES
# pointer: two distractor chains need >= 2 statements; chain: ~6 bytes per hop, 8 hops stay under PROMPT_MAX_BYTES
MAX_DIFFICULTY = {"pointer": POINTER_STATEMENTS - 3, "chain": 8, "sum": 16, "walk": 16}
EVAL_SIZE = 500  # size of the fixed eval and hard sets
TRAIN_SIZE = 10_000  # default train size; any size works, examples are generated on demand
HELDOUT_MOD = 10  # 1 in 10 problems is held out
PROMPT_MAX_BYTES = 58  # + <|bos|><|user_start|><|user_end|><|assistant_start|> stays < 64 tokens
_MAX_TRIES = 10_000
_VARS = "abcdefghijklmnopqrstuvwxyz"
_WALK_ONE_MOVE = re.compile(r"\d;[a-z]\?")
# walk: four fixed permutations of the digits (the image of digit i is move[i]); together they are not commutative.
WALK_MOVES = {
    "a": (3, 8, 0, 6, 1, 9, 4, 2, 7, 5),
    "b": (1, 2, 3, 4, 5, 6, 7, 8, 9, 0),
    "c": (9, 4, 7, 1, 0, 2, 8, 5, 3, 6),
    "d": (5, 0, 9, 3, 7, 8, 2, 6, 4, 1),
}
_WALK_LETTERS = tuple(WALK_MOVES)


def _chain(rng: random.Random, hops: int, order: str) -> tuple[str, str]:
    """Variable tracking: each new variable is the previous one +- a digit; values stay in [0, 99]."""
    names = rng.sample(_VARS, hops + 1)  # random names so the order is not given away by the alphabet
    value = rng.randint(0, 9)
    statements = [f"{names[0]}={value}"]
    for prev, name in zip(names, names[1:], strict=False):
        delta = rng.randint(1, 9)
        # Pick the sign that keeps the value in [0, 99] so answers stay short and non-negative.
        sign = rng.choice("+-") if delta <= value <= 99 - delta else ("+" if value < delta else "-")
        value = value + delta if sign == "+" else value - delta
        statements.append(f"{name}={prev}{sign}{delta}")
    if order == "shuffled":
        rng.shuffle(statements)  # pointer chasing: the model has to find each variable's definition
    return ";".join(statements) + f";{names[-1]}?", str(value)


def _pointer(rng: random.Random, hops: int, order: str) -> tuple[str, str]:
    """Pointer chasing: the asked chain has `hops` copies above its digit; two distractor chains fill the rest.

    forward: each chain in dependency order, the chains interleaved at random (every definition precedes its use);
    shuffled: any order. Either way which statements belong to the asked chain is only found by following it.
    """
    names = rng.sample(_VARS, POINTER_STATEMENTS)  # one name per statement: chains are disjoint
    rest = POINTER_STATEMENTS - (hops + 1)
    split = rng.randint(1, rest - 1)
    digits = rng.sample("0123456789", 3)
    chains, start = [], 0
    for length, digit in zip((hops + 1, split, rest - split), digits, strict=True):
        own = names[start:start + length]
        start += length
        chains.append([f"{own[0]}={digit}"] + [f"{b}={a}" for a, b in zip(own, own[1:], strict=False)])
    if order == "shuffled":
        statements = [st for chain in chains for st in chain]
        rng.shuffle(statements)
    else:
        statements, heads = [], [0, 0, 0]
        while len(statements) < POINTER_STATEMENTS:
            j = rng.choice([j for j in range(3) if heads[j] < len(chains[j])])
            statements.append(chains[j][heads[j]])
            heads[j] += 1
    return ";".join(statements) + f";{names[hops]}?", digits[0]


def _sum(rng: random.Random, additions: int) -> tuple[str, str]:
    """Multi-operand addition of single digits."""
    operands = [rng.randint(1, 9) for _ in range(additions + 1)]
    return "+".join(map(str, operands)) + "=?", str(sum(operands))


def _walk(rng: random.Random, moves: int) -> tuple[str, str]:
    """State tracking: the start digit moved by each letter in turn (separated by ';' so each is its own token)."""
    digit = rng.randint(0, 9)
    letters = [rng.choice(_WALK_LETTERS) for _ in range(moves)]
    prompt = ";".join([str(digit), *letters]) + "?"
    for letter in letters:
        digit = WALK_MOVES[letter][digit]
    return prompt, str(digit)


def walk_states(prompt: str) -> list[tuple[int, str]]:
    """(characters read, digit reached) after the start digit and after each move of a walk prompt."""
    body = prompt.rstrip("?")
    digit = int(body[0])
    states = [(1, str(digit))]
    for i in range(2, len(body), 2):  # "7;c;a" -> moves at 2, 4, ...
        digit = WALK_MOVES[body[i]][digit]
        states.append((i + 1, str(digit)))
    return states


def is_held_out(prompt: str) -> bool:
    """True if a problem belongs to the held-out (eval/hard) side of the problem space.

    A one-move walk is never held out: it is one entry of the move table, which only training can show (a held-out
    entry could not be inferred from anything), so the walks of the eval split have 2-4 moves.
    """
    if _WALK_ONE_MOVE.fullmatch(prompt):
        return False
    return stable_hash(prompt) % HELDOUT_MOD == 0


class Reasoning(Task):
    """Generated multi-hop reasoning problems, graded by exact match of the final number."""

    def __init__(
        self,
        kind: str = "pointer",
        split: str = "train",
        difficulty: int | tuple[int, int] | list[int] | None = None,
        size: int | None = None,
        seed: int = 0,
        order: str = "forward",
        state_targets: bool = False,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        check_choice("Reasoning.kind", kind, KINDS)
        if state_targets and kind != "walk":
            raise ValueError(f"Reasoning.state_targets=True needs kind='walk', got kind={kind!r}")
        check_choice("Reasoning.split", split, REASONING_SPLITS)
        check_choice("Reasoning.order", order, ORDERS)
        if order == "shuffled" and kind in ("sum", "walk"):
            raise ValueError(f"Reasoning.order='shuffled' needs kind='pointer' or 'chain', got kind={kind!r}")
        if split != "train" and seed != 0:
            # Held-out sets are fixed so every run scores on the same problems.
            raise ValueError(f"Reasoning.seed={seed} must be 0 for split={split!r} (held-out sets are fixed)")
        if difficulty is None:
            difficulty = HARD_DIFFICULTY if split == "hard" else TRAIN_DIFFICULTY
        lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else tuple(difficulty)
        if not 1 <= lo <= hi <= MAX_DIFFICULTY[kind]:
            raise ValueError(
                f"Reasoning.difficulty={difficulty!r} must be an int or (lo, hi) with 1 <= lo <= hi <= "
                f"{MAX_DIFFICULTY[kind]} for kind={kind!r}"
            )
        size = (TRAIN_SIZE if split == "train" else EVAL_SIZE) if size is None else size
        if size < 1:
            raise ValueError(f"Reasoning.size={size} must be >= 1")
        self.kind, self.split, self.order = kind, split, order
        self.difficulty, self.size, self.seed = (lo, hi), size, seed
        # walk: each conversation also carries the digit after every move as `prompt_targets`, intermediate targets
        # a training loader puts on the prompt's positions (Tokenizer.render_training). The prompt and the scored
        # answer are unchanged; the targets only tell each move's position what the recurrence must have computed
        # there. Measured on walk (docs/LOG.md, 2026-12-07): the final-answer-only loss needed ~1,500-3,000 steps to
        # leave chance (seed-dependent); with these targets 250-500.
        self.state_targets = state_targets

    @property
    def name(self) -> str:
        return f"Reasoning-{self.kind}-{self.split}"

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def problem(self, index: int) -> tuple[str, str, int]:
        """(prompt, answer, difficulty) of an underlying index."""
        rng = example_rng("reasoning", self.kind, self.order, self.split, self.seed, index)
        want_held_out = self.split != "train"
        for _ in range(_MAX_TRIES):
            hops = rng.randint(*self.difficulty)
            if self.kind == "pointer":
                prompt, answer = _pointer(rng, hops, self.order)
            elif self.kind == "chain":
                prompt, answer = _chain(rng, hops, self.order)
            elif self.kind == "walk":
                prompt, answer = _walk(rng, hops)
            else:
                prompt, answer = _sum(rng, hops)
            if is_held_out(prompt) == want_held_out:
                return prompt, answer, hops
        raise RuntimeError(f"Reasoning: no {self.split} problem found in {_MAX_TRIES} tries at index {index}")

    def get_example(self, index: int) -> Conversation:
        prompt, answer, hops = self.problem(index)
        # "difficulty": eval reports break accuracy and recurrences per token down by it (renderers ignore it)
        conversation = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                        "difficulty": hops}
        if self.state_targets:
            conversation["prompt_targets"] = walk_states(prompt)
        return conversation

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Exact match of the completion (special tokens and whitespace stripped; `#### N` also accepted)."""
        text = strip_special(completion).strip()
        answer = extract_final_answer(text) if "####" in text else text
        return answer == conversation["messages"][-1]["content"]
