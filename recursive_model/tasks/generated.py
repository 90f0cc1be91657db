"""Tasks generated in code, so training mixtures and evals need no download: identity, arithmetic, SpellingBee.

Every example is a pure function of (task, split, seed, index): random access, no precomputed tables, and the same
conversation on every rank and every run. Train and eval splits draw from different seed namespaces.
"""

from __future__ import annotations

from typing import Any

from recursive_model.tasks.base import (
    Conversation,
    EvalType,
    Task,
    check_choice,
    example_rng,
    extract_final_answer,
    strip_special,
)

SPLITS = ("train", "eval")
MODEL_NAME = "Recursive NanoChat"

# ---------------------------------------------------------------------------------------------------------- identity

_IDENTITY_QA: list[tuple[list[str], list[str]]] = [
    (
        ["Who are you?", "who are you", "What are you?", "Tell me about yourself.", "Introduce yourself, please."],
        [
            f"I'm {MODEL_NAME}, a small language model. My middle block of transformer layers runs in a loop, so I "
            "can spend more computation on harder inputs by running more recurrences.",
            f"I am {MODEL_NAME}: a compact recursive (recurrent-depth) GPT trained in the nanochat style. "
            "A shared block of layers is applied several times per token instead of stacking many distinct layers.",
        ],
    ),
    (
        ["What is your name?", "what's your name", "Do you have a name?", "How should I call you?"],
        [f"My name is {MODEL_NAME}.", f"I'm called {MODEL_NAME}. I'm a small recursive language model."],
    ),
    (
        ["How do you work?", "What is special about your architecture?", "Are you a normal transformer?"],
        [
            "I'm a recursive transformer with three parts: a prelude of layers that reads the input, a block that is "
            "applied a variable number of times, and a coda that produces the next token. More recurrences give me "
            "more depth without more parameters.",
            "Unlike a standard GPT, my middle block is recursive: the same layers are applied again and again to a "
            "latent state. I can run more recurrences when a question is hard and fewer when it is easy.",
        ],
    ),
    (
        ["Who made you?", "Who trained you?", "Where do you come from?"],
        [
            f"{MODEL_NAME} was trained with the open-source recursive-nanochat project, which follows the nanochat "
            "recipe (pretraining, mid-training, supervised fine-tuning) and runs on Ray.",
            "I was trained by the recursive-nanochat project: an open-source codebase that trains and serves small "
            "recursive GPTs with Ray.",
        ],
    ),
    (
        ["Are you ChatGPT?", "Are you GPT-4?", "Are you a large model?"],
        [
            f"No, I'm {MODEL_NAME}, a much smaller model. I can make mistakes, so please double-check important "
            "answers.",
            f"No. I'm {MODEL_NAME}, a small recursive GPT, far smaller than the large chat assistants.",
        ],
    ),
    (
        ["Can you use tools?", "Can you do math?"],
        [
            "Yes. Though I'm a small recursive model, I can call a calculator for arithmetic: I write the "
            "expression, the calculator runs it, and I use its result in my answer.",
        ],
    ),
]
_GREETINGS = ["Hi!", "Hello", "hey there", "Good morning!", "Hi, nice to meet you."]
_GREETING_REPLIES = [
    f"Hello! I'm {MODEL_NAME}. How can I help you today?",
    "Hi! What can I do for you?",
    f"Hey! {MODEL_NAME} here. Ask me anything.",
]


class Identity(Task):
    """Templated "who are you" conversations about this model (1-2 turns, optionally opening with a greeting)."""

    def __init__(self, size: int = 500, seed: int = 0, split: str = "train", **slicing: Any) -> None:
        super().__init__(**slicing)
        check_choice("Identity.split", split, SPLITS)
        if size < 1:
            raise ValueError(f"Identity.size={size} must be >= 1")
        self.size, self.seed, self.split = size, seed, split

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> Conversation:
        rng = example_rng("identity", self.split, self.seed, index)
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            messages += [
                {"role": "user", "content": rng.choice(_GREETINGS)},
                {"role": "assistant", "content": rng.choice(_GREETING_REPLIES)},
            ]
        for questions, answers in rng.sample(_IDENTITY_QA, k=rng.choice([1, 1, 2])):
            messages += [
                {"role": "user", "content": rng.choice(questions)},
                {"role": "assistant", "content": rng.choice(answers)},
            ]
        return {"messages": messages}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """A reply is right when it names the model or calls itself recursive (every reference answer does)."""
        text = strip_special(completion).lower()
        return MODEL_NAME.lower() in text or "recursive" in text


# -------------------------------------------------------------------------------------------------------- arithmetic

_ARITH_QUESTIONS = [
    "What is {expr}?",
    "Compute {expr}.",
    "Calculate {expr}",
    "what's {expr}",
    "Please evaluate {expr}.",
    "{expr} = ?",
]
_ARITH_OPENERS = ["Let me use the calculator.", "I'll compute this with the calculator.", "Using the calculator:", ""]


class Arithmetic(Task):
    """Integer arithmetic answered through a calculator tool call, ending in `#### <result>`."""

    def __init__(
        self, size: int = 1000, seed: int = 0, split: str = "train", max_digits: int = 3, **slicing: Any
    ) -> None:
        super().__init__(**slicing)
        check_choice("Arithmetic.split", split, SPLITS)
        if size < 1:
            raise ValueError(f"Arithmetic.size={size} must be >= 1")
        if not 1 <= max_digits <= 6:
            raise ValueError(f"Arithmetic.max_digits={max_digits} must be in [1, 6]")
        self.size, self.seed, self.split, self.max_digits = size, seed, split, max_digits

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def _expression(self, rng: Any) -> str:
        num = lambda: str(rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1))
        a, b, c = num(), num(), num()
        form = rng.choice(["{a}+{b}", "{a}-{b}", "{a}*{b}", "({a}+{b})*{c}", "{a}*{b}+{c}", "{a}*{b}-{c}"])
        return form.format(a=a, b=b, c=c)

    def get_example(self, index: int) -> Conversation:
        rng = example_rng("arithmetic", self.split, self.seed, index)
        expr = self._expression(rng)
        result = str(eval(expr, {"__builtins__": {}}))  # our own generated digits and + - * ( ): safe
        pretty = expr.replace("+", " + ").replace("-", " - ").replace("*", " * ")
        opener = rng.choice(_ARITH_OPENERS)
        parts = [
            {"type": "text", "text": opener},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": result},
            {"type": "text", "text": f"So {pretty} = {result}.\n\n#### {result}"},
        ]
        if not opener:
            parts = parts[1:]
        return {
            "messages": [
                {"role": "user", "content": rng.choice(_ARITH_QUESTIONS).format(expr=pretty)},
                {"role": "assistant", "content": parts},
            ]
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Exact match of the `#### N` answer against the calculator's result."""
        reference = conversation["messages"][-1]["content"][-2]["text"]
        return extract_final_answer(completion) == reference


# ------------------------------------------------------------------------------------------------------ spelling bee

# A small shipped word list (common English words, 4-12 letters) so SpellingBee needs no download.
WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon mango papaya pineapple watermelon grape peach
computer keyboard monitor printer network program function variable compiler library terminal software hardware
mississippi tennessee massachusetts connecticut california pennsylvania alabama colorado minnesota missouri
elephant giraffe kangaroo penguin dolphin octopus squirrel hedgehog crocodile butterfly mosquito caterpillar
mountain river valley forest desert island volcano glacier canyon meadow waterfall ocean lagoon
bookkeeper committee balloon coffee address success possess assessment embarrass occasion accommodate
necessary tomorrow parallel beginning believe calendar cemetery conscience definitely discipline
grammar harass immediately independent knowledge library license maintenance millennium neighbor
occurrence pastime privilege receive recommend referred rhythm schedule separate threshold tyranny
vacuum weird yellow zebra quiz jazz fizz buzz puzzle dazzle sizzle pizza zigzag
teacher student school pencil notebook eraser chalkboard classroom homework lesson
kitchen bedroom bathroom garden garage window ceiling chimney curtain carpet pillow blanket
history science biology chemistry physics geometry algebra calculus statistics astronomy
happiness kindness darkness business wilderness bitterness loneliness forgiveness
summer winter autumn spring january february september october november december
bicycle airplane helicopter submarine motorcycle tractor scooter skateboard rocket
chocolate vanilla caramel cinnamon pepper mustard ketchup mayonnaise spaghetti lasagna
doctor engineer lawyer farmer pilot baker butcher carpenter plumber electrician
""".split()

_BEE_QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many {letter}s are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter} in {word}",
    "how many {letter} in {word}",
    "In the word '{word}', how many times does '{letter}' occur?",
]


class SpellingBee(Task):
    """Count a letter in a word: spell it out, count by hand, check with the calculator, answer `#### N` (nanochat).

    The check is the tool call `'strawberry'.count('r')`, which the calculator allows (recursive_model/calculator.py).
    """

    def __init__(
        self,
        size: int = 1000,
        seed: int = 0,
        split: str = "train",
        words: list[str] | None = None,
        calculator: bool = True,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        check_choice("SpellingBee.split", split, SPLITS)
        if size < 1:
            raise ValueError(f"SpellingBee.size={size} must be >= 1")
        self.words = list(words) if words is not None else WORDS
        if not self.words:
            raise ValueError("SpellingBee.words must not be empty")
        self.size, self.seed, self.split, self.calculator = size, seed, split, calculator

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> Conversation:
        rng = example_rng("spelling_bee", self.split, self.seed, index)
        word = rng.choice(self.words)
        # Mostly ask about a letter that occurs, sometimes about one that does not (answer 0).
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        lines = [
            f"We are asked to count the letter '{letter}' in the word '{word}'. Let me spell the word out first:",
            f"{word}:{','.join(word)}",
            "",
            f"Now I count the occurrences of '{letter}':",
        ]
        running = 0
        for i, ch in enumerate(word, start=1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} hit! count={running}")
            else:
                lines.append(f"{i}:{ch}")
        lines.append(f"\nThis gives us {count}.")
        parts: list[dict[str, str]] = []
        if self.calculator:
            lines.append("\nLet me double check this with the calculator:")
            parts = [
                {"type": "text", "text": "\n".join(lines)},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(count)},
                {"type": "text", "text": f"The calculator agrees: {count}.\n\n#### {count}"},
            ]
        else:
            parts = [{"type": "text", "text": "\n".join(lines) + f"\n\n#### {count}"}]
        question = rng.choice(_BEE_QUESTIONS).format(letter=letter, word=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Exact match of the `#### N` count."""
        reference = extract_final_answer(conversation["messages"][-1]["content"][-1]["text"])
        return extract_final_answer(completion) == reference
