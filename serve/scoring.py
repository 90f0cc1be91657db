"""Log-probabilities of given tokens: one full forward at r, the scoring half of /v1/completions (echo + logprobs).

    ids (T,) --GPT.forward(num_recur=r)--> log_softmax (T, V) --> per position: log p(ids[t] | ids[:t]), top-n

A loglikelihood request (lm-eval's `echo=True, logprobs=1, max_tokens=1`) costs this one forward: the prompt is never
decoded token by token, and a greedy one-token completion is the argmax of the last position. Pure PyTorch (no Ray):
the tier replica's engine loop runs it on a thread of its own, next to the step (the forward only reads the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# T=time (tokens scored), V=vocab, N=top-n


@dataclass(frozen=True)
class ScoreRequest:
    """What a replica scores: `ids` at r = `num_recur`, with the `top_n` most likely tokens of every position."""

    ids: tuple[int, ...]
    num_recur: int
    top_n: int = 0  # 0: only the given tokens' log-probabilities


@dataclass
class TokenScores:
    """Position t holds the distribution that predicted ids[t] (so position 0, which nothing predicts, is None)."""

    logprobs: list[float | None]  # log p(ids[t] | ids[:t])
    top: list[list[tuple[int, float]] | None]  # the top_n (id, log p) of that distribution, most likely first
    next_top: list[tuple[int, float]]  # the top max(top_n, 1) after the last id: [0] is the greedy next token
    num_recur: int


@torch.no_grad()
def score_tokens(model: torch.nn.Module, request: ScoreRequest) -> TokenScores:
    """One forward over `request.ids` at its r; float32 log-probabilities whatever the model's dtype."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(request.ids)], dtype=torch.long, device=device)
    logp = torch.log_softmax(model(idx, num_recur=request.num_recur)[0].float(), dim=-1)  # (T, V)
    chosen = logp[:-1].gather(1, idx[0, 1:, None])[:, 0].tolist()  # (T-1,)
    k = min(max(request.top_n, 1), logp.size(-1))
    values, indices = logp.topk(k, dim=-1)  # (T, k)
    tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    n = request.top_n
    return TokenScores(
        logprobs=[None, *chosen],
        top=[None, *(row[:n] for row in tops[:-1])],
        next_top=tops[-1],
        num_recur=request.num_recur,
    )
