"""A small GPT over bytes (GPT-2's layout, as nanoGPT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2, Radford et al. 2019)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A decoder-only transformer language model (GPT-2's layout, Radford et al. 2019, at small scale, as
    Karpathy's nanoGPT): byte embeddings plus learned positions, ``n_layer`` blocks, a final LayerNorm,
    and next-byte logits through the token embedding's transpose (weight tying, Press & Wolf 2017).
    Linear and embedding weights start at N(0, 0.02), the residual projections at N(0, 0.02/sqrt(2 n_layer)).

    Input int64 [B, T] (T <= block_size), output logits [B, T, vocab]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 256, image_size: int = 64, n_layer: int = 2,
                 n_head: int = 2, n_embd: int = 64, block_size: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if image_size > block_size:
            raise ValueError(f"allowed at most model.block_size={block_size} bytes per window for this GPT")
        self.block_size = block_size
        self.wte = nn.Embedding(num_classes, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[_Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.drop = nn.Dropout(dropout)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[-1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        return self.head(self.ln_f(self.blocks(x)))
