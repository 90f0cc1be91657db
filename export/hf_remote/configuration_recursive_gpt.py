"""Configuration of a recursive (recurrent-depth) GPT for Hugging Face transformers.

Shipped inside an exported model directory and loaded with `trust_remote_code=True`; it imports transformers only.
Architecture: prelude (`n_prelude` layers, once) -> recurrent block (`n_recur` layers, applied `num_recur` times to a
state that the prelude output is injected into) -> coda (`n_coda` layers, once). `num_recur` is only the default:
`model(ids, num_recur=8)` and `model.generate(ids, num_recur=8)` choose the budget per call.
"""

from transformers import PretrainedConfig

INJECT_MODES = ("concat_linear", "add")
# "noise" (a random s0 per sequence) is not offered: generate() has no per-sequence seed to draw it from reproducibly.
STATE_INITS = ("embed", "zeros")


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"RecursiveGPTConfig.{name}={value!r} is invalid; allowed {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RecursiveGPTConfig(PretrainedConfig):
    model_type = "recursive_gpt"

    def __init__(
        self,
        vocab_size: int = 65536,  # tokenizer vocabulary incl. the chat special tokens
        max_position_embeddings: int = 2048,  # context length the model was trained at
        hidden_size: int = 1280,  # model width D
        num_attention_heads: int = 10,  # query heads; head_dim = hidden_size / num_attention_heads
        num_key_value_heads: int = 10,  # key/value heads (grouped-query attention when fewer)
        n_prelude: int = 2,  # P: layers applied once before the recurrence
        n_recur: int = 4,  # R: layers of the recurrent block (0 = a plain GPT)
        n_coda: int = 2,  # C: layers applied once after the recurrence
        num_recur: int = 4,  # default recurrences per token, overridable per forward / generate call
        inject_mode: str = "concat_linear",  # concat_linear: Linear(2D -> D) over [e, s]; add: e + s
        state_init: str = "embed",  # initial state s0: embed (s0 = prelude output) | zeros
        softcap: float = 15.0,  # logits = softcap * tanh(logits / softcap); 0 disables
        rope_theta: float = 10000.0,  # rotary embedding base
        sliding_window: int = 0,  # causal attention window of prelude and recurrent layers in tokens; 0 = whole context
        coda_window: int = 0,  # the coda layers' window
        initializer_range: float = 0.02,  # std of the init used when a model is built without weights
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.n_prelude, self.n_recur, self.n_coda = n_prelude, n_recur, n_coda
        self.num_recur = num_recur
        self.inject_mode = inject_mode
        self.state_init = state_init
        self.softcap = softcap
        self.rope_theta = rope_theta
        self.sliding_window = sliding_window
        self.coda_window = coda_window
        self.initializer_range = initializer_range
        for derived in ("num_hidden_layers", "head_dim"):  # written into config.json, recomputed on load
            kwargs.pop(derived, None)
        kwargs.setdefault("tie_word_embeddings", False)  # lm_head and the embedding are separate matrices
        super().__init__(**kwargs)
        self.check_fields()

    def check_fields(self) -> None:
        """Validate the architecture fields and derive head_dim and num_hidden_layers (the model calls this too:
        from_pretrained sets keyword overrides such as num_recur=8 after __init__)."""
        for name in (
            "vocab_size",
            "max_position_embeddings",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "num_recur",
        ):
            value = getattr(self, name)
            _check(name, value, _is_int(value) and value >= 1, "an int >= 1")
        for name in ("n_prelude", "n_recur", "n_coda"):
            value = getattr(self, name)
            _check(name, value, _is_int(value) and value >= 0, "an int >= 0")
        layers = self.n_prelude + self.n_recur + self.n_coda
        _check("n_prelude + n_recur + n_coda", layers, layers >= 1, "at least one layer")
        heads = self.num_attention_heads
        _check(
            "hidden_size",
            self.hidden_size,
            self.hidden_size % heads == 0 and (self.hidden_size // heads) % 2 == 0,
            f"a multiple of num_attention_heads={heads} with an even head_dim (rotary)",
        )
        _check(
            "num_key_value_heads",
            self.num_key_value_heads,
            heads % self.num_key_value_heads == 0,
            f"a divisor of num_attention_heads={heads}",
        )
        for name in ("sliding_window", "coda_window"):
            window = getattr(self, name)
            _check(name, window, _is_int(window) and window >= 0, "an int >= 0 (0 = the whole context)")
        _check("inject_mode", self.inject_mode, self.inject_mode in INJECT_MODES, f"one of {INJECT_MODES}")
        _check("state_init", self.state_init, self.state_init in STATE_INITS, f"one of {STATE_INITS} (see STATE_INITS)")
        for name in ("softcap", "rope_theta"):
            value = getattr(self, name)
            _check(
                name,
                value,
                isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                "a number >= 0",
            )
        self.head_dim = self.hidden_size // heads
        # Layers with weights; a token passes through n_prelude + n_recur * num_recur + n_coda of them.
        self.num_hidden_layers = layers

    @property
    def effective_depth(self) -> int:
        """Layers a token passes through at the default num_recur."""
        return self.n_prelude + self.n_recur * self.num_recur + self.n_coda
