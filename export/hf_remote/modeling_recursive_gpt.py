"""A recursive (recurrent-depth) GPT as a Hugging Face transformers causal LM.

Shipped inside an exported model directory and loaded with `trust_remote_code=True`; it imports torch and
transformers only. The math: x = rmsnorm(embed(ids)); the prelude blocks; e = x, s = s0(e); `num_recur` times
s = recurrent_blocks(inject(s, e)); the coda blocks on s; logits = softcap(lm_head(rmsnorm(x))).
A block is pre-norm attention (rotary, QK-norm) + relu^2 MLP, parameter-free RMSNorm, no biases.

KV cache: a transformers DynamicCache with one layer per prelude block, one per recurrent block *per recurrence*
(the "exact" layout: at recurrence i a token attends to the recurrence-i keys of the tokens before it, as in the full
forward) and one per coda block, in execution order. A cache therefore serves the one `num_recur` it was filled at.

Shapes: B=batch, T=new tokens, L=keys visible (cached + new), D=model dim, H=heads, Hk=kv heads, Dh=head dim, V=vocab.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_recursive_gpt import RecursiveGPTConfig

# transformers 5 names the cache `cache` (argument and output field); 4.x named it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, 1, Dh/2) of the rotary embedding at integer `positions` (B, T)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    angle = positions.to(torch.float32)[..., None] * (1.0 / theta**exponent)
    return angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i + Dh/2]) of x (B, T, H, Dh) by the position's angles."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos + second * sin, second * cos - first * sin), dim=-1)


class RecursiveGPTAttention(nn.Module):
    def __init__(self, config: RecursiveGPTConfig):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        self.c_q = nn.Linear(d, self.heads * dh, bias=False)
        self.c_k = nn.Linear(d, self.kv_heads * dh, bias=False)
        self.c_v = nn.Linear(d, self.kv_heads * dh, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, rope, mask, cache, cache_layer):
        B, T, D = x.shape
        cos, sin = rope
        q = rms(rotate(self.c_q(x).view(B, T, self.heads, self.head_dim), cos, sin)).transpose(1, 2)
        k = rms(rotate(self.c_k(x).view(B, T, self.kv_heads, self.head_dim), cos, sin)).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, Dh)
        if cache is not None:
            k, v = cache.update(k, v, cache_layer)  # (B, Hk, L, Dh)
        if self.kv_heads != self.heads:  # query head h reads kv head h // (H / Hk)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class RecursiveGPTBlock(nn.Module):
    """Pre-norm attention, then a relu^2 MLP (4x wide), each added to the residual stream."""

    def __init__(self, config: RecursiveGPTConfig):
        super().__init__()
        d = config.hidden_size
        self.attn = RecursiveGPTAttention(config)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d, bias=False), "c_proj": nn.Linear(4 * d, d, bias=False)})

    def forward(self, x, rope, mask, cache, cache_layer):
        h = x + self.attn(rms(x), rope, mask, cache, cache_layer)
        return h + self.mlp.c_proj(torch.relu(self.mlp.c_fc(rms(h))) ** 2)


class RecursiveGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """`model(input_ids, num_recur=r)` -> logits (B, T, V); `model.generate(input_ids, num_recur=r)` decodes at r."""

    config_class = RecursiveGPTConfig
    base_model_prefix = ""
    _no_split_modules = ["RecursiveGPTBlock"]

    def __init__(self, config: RecursiveGPTConfig):
        config.check_fields()  # from_pretrained applies keyword overrides after the config's own checks
        super().__init__(config)
        d = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, d)
        self.prelude = nn.ModuleList(RecursiveGPTBlock(config) for _ in range(config.n_prelude))
        self.recur = nn.ModuleList(RecursiveGPTBlock(config) for _ in range(config.n_recur))
        self.coda = nn.ModuleList(RecursiveGPTBlock(config) for _ in range(config.n_coda))
        use_adapter = config.n_recur > 0 and config.inject_mode == "concat_linear"
        self.adapter = nn.Linear(2 * d, d, bias=False) if use_adapter else None
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The cache layout depends on num_recur, which generate() does not know when it builds a cache from the
        # config: forward() builds it at the first call instead (a DynamicCache that grows a layer per update).
        return False

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def cache_layers(self, num_recur: int) -> int:
        """Cache layers of the exact layout at `num_recur`."""
        cfg = self.config
        return cfg.n_prelude + cfg.n_recur * num_recur + cfg.n_coda

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_recur: int | None = None,
        return_dict: bool | None = None,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ):
        """Logits (B, T, V) in float32 for `input_ids` appended to `cache` (if any), at `num_recur` recurrences.

        `attention_mask` (B, L) marks real tokens (left padding in generate); without `position_ids` the positions
        count real tokens only. A cache is built when `use_cache` is true and none is given. `labels` (-100 =
        ignored) give the mean next-token cross-entropy as `loss`. Returns a CausalLMOutputWithPast whatever
        `return_dict`; other keyword arguments that generate() passes (e.g. output_attentions=False) are ignored.
        """
        cfg = self.config
        r = cfg.num_recur if num_recur is None else num_recur
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"num_recur={r!r} is invalid; allowed an int >= 1")
        if input_ids is None:
            raise ValueError("input_ids is required (this model takes no inputs_embeds)")
        cache = past_key_values if cache is None else cache
        if cache is None and use_cache:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = self._check_cache(cache, r)
        rope, (mask, coda_mask) = self._positions(input_ids, attention_mask, position_ids, past,
                                                  (cfg.sliding_window, cfg.coda_window))

        x = rms(self.wte(input_ids))
        layer = 0  # cache layers are numbered in execution order
        for block in self.prelude:
            x, layer = block(x, rope, mask, cache, layer), layer + 1
        if cfg.n_recur:
            e = x
            s = e if cfg.state_init == "embed" else torch.zeros_like(e)
            for _ in range(r):
                x = self.adapter(torch.cat((e, s), dim=-1)) if self.adapter is not None else e + s
                for block in self.recur:
                    x, layer = block(x, rope, mask, cache, layer), layer + 1
                s = x
        for block in self.coda:
            x, layer = block(x, rope, coda_mask, cache, layer), layer + 1
        logits = self.lm_head(rms(x)).float()
        if cfg.softcap > 0:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _check_cache(self, cache, r: int) -> int:
        """Tokens already in `cache` (0 without one); refuses a cache filled at another num_recur."""
        if cache is None:
            return 0
        past = cache.get_seq_length()
        if past and len(cache) != self.cache_layers(r):
            raise ValueError(
                f"num_recur={r} needs a cache of {self.cache_layers(r)} layers; this one holds {len(cache)}, so it "
                f"was filled at another num_recur: a cache serves the num_recur it was filled at, start a new one"
            )
        return past

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor, B: int, L: int) -> torch.Tensor:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, L):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; allowed (batch, cached + new "
                f"tokens) = ({B}, {L})"
            )
        return attention_mask.bool()

    def _positions(self, input_ids, attention_mask, position_ids, past: int, windows: tuple[int, ...]):
        """Rotary angles of the new tokens and one attention mask per entry of `windows` (tokens, 0 = the whole
        context; a mask None = plain causal, no padding, no cache)."""
        B, T = input_ids.shape
        L, dev = past + T, input_ids.device
        real = None if attention_mask is None else self._check_mask(attention_mask, B, L)
        if position_ids is None:
            if real is None:
                position_ids = torch.arange(past, L, device=dev).expand(B, T)
            else:  # positions count real tokens, so a left-padded row sees the positions of an unpadded one
                position_ids = (real.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        cos, sin = rotary_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        rope = cos.to(self.dtype), sin.to(self.dtype)  # angles in float32, applied in the weights' dtype
        query_at = torch.arange(past, L, device=dev)[:, None]  # (T, 1) index of each new token in the sequence
        key_at = torch.arange(L, device=dev)[None, :]  # (1, L)

        def mask(window: int) -> torch.Tensor | None:
            if real is None and past == 0 and not window:
                return None
            visible = key_at <= query_at  # (T, L) causal
            if window:  # padding only precedes a row's tokens, so sequence indices measure the window as positions do
                visible = visible & (key_at > query_at - window)
            visible = visible[None]  # (1, T, L)
            if real is not None:
                # A padding query sees itself only: a row of no visible keys would give NaN, and NaN values poison
                # real rows through their zero attention weights.
                visible = (visible & real[:, None, :]) | (key_at == query_at)[None]
            return visible[:, None]  # (B or 1, 1, T, L)

        return rope, [mask(w) for w in windows]
