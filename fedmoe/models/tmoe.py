"""Decoder-only Transformer whose feed-forward blocks are top-k MoE layers.

Pre-trained as a byte-level language model (phase ``pretrain``), then fine-tuned as a
sequence classifier (phase ``finetune``) on the same trunk. See :class:`TransformerMoE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.config import DISPATCHES, GATES
from fedmoe.models.layers import TopKMoE
from fedmoe.models.prior import LabelPrior
from fedmoe.models.tasks import Classification, LanguageModel
from fedmoe.roles import Role, set_role

PHASES = ("pretrain", "finetune")


@dataclass(frozen=True)
class TMoEConfig:
    """Shape of a :class:`TransformerMoE` (byte-level defaults)."""

    vocab_size: int = 256
    seq_len: int = 64  # max positions
    num_classes: int = 4  # downstream classification classes
    hidden_dim: int = 64  # d_model
    num_heads: int = 4
    num_layers: int = 1
    expert_hidden_dim: int = 32
    num_always_on_experts: int = 1  # shared experts every token goes through (unrouted)
    num_shared_experts: int = 2  # routed, shared (aggregated by the server)
    num_local_experts: int = 2  # routed, local (never leave the client)
    top_k: int = 2
    gate: str = "linear"  # "linear" | "attention" (see layers.Router)
    dispatch: str = "dense"  # "dense" | "sparse" (see fedmoe.models.experts)
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    unigram_prior: bool = False  # a personal DP unigram prior on the next-token logits

    def __post_init__(self) -> None:
        positive = ("vocab_size", "seq_len", "num_classes", "hidden_dim", "num_heads",
                    "num_layers", "expert_hidden_dim", "num_shared_experts", "top_k")
        bad = [n for n in positive if getattr(self, n) < 1]
        if bad:
            raise ValueError(f"TMoEConfig: {bad} must be positive")
        non_negative = ("num_always_on_experts", "num_local_experts", "balance_coef",
                        "z_loss_coef")
        bad = [n for n in non_negative if getattr(self, n) < 0]
        if bad:
            raise ValueError(f"TMoEConfig: {bad} must be non-negative")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"TMoEConfig: hidden_dim={self.hidden_dim} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.top_k > self.num_shared_experts + self.num_local_experts:
            raise ValueError(
                f"TMoEConfig: top_k={self.top_k} exceeds the number of routed experts, "
                f"{self.num_shared_experts + self.num_local_experts} ({self.num_shared_experts} "
                f"shared + {self.num_local_experts} local)")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"TMoEConfig: dispatch must be one of {DISPATCHES}, got "
                             f"{self.dispatch!r}")
        if self.gate not in GATES:
            raise ValueError(f"TMoEConfig: gate must be one of {GATES}, got {self.gate!r}")


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention from two ``nn.Linear`` and SDPA. (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(
            2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN block: ``x + Attn(LN1(x))``, then ``x + MoE(LN2(x))``; returns (x, aux (B,))."""

    def __init__(self, config: TMoEConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_dim)
        self.attn = CausalSelfAttention(config.hidden_dim, config.num_heads)
        self.ln2 = nn.LayerNorm(config.hidden_dim)
        self.moe = TopKMoE(
            config.hidden_dim,
            config.expert_hidden_dim,
            config.num_shared_experts,
            config.num_local_experts,
            config.top_k,
            num_always_on=config.num_always_on_experts,
            gate=config.gate, dispatch=config.dispatch,
            balance_coef=config.balance_coef,
            z_loss_coef=config.z_loss_coef,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        h, aux = self.moe(self.ln2(x))
        return x + h, aux


class TransformerMoE(nn.Module):
    """Pre-LN decoder-only Transformer whose feed-forward blocks are MoE layers.

    Layout: token embedding + learned positional embedding -> ``num_layers`` ×
    (``x + Attn(LN1(x))``; ``x + MoE(LN2(x))``) -> final LayerNorm -> a head:

    - phase ``pretrain`` (default): ``lm_head``, next-token logits (B, L, vocab_size);
      ``task`` is :class:`~fedmoe.models.tasks.LanguageModel` (targets (B, L)). With
      ``unigram_prior``, the client's own byte unigram log-distribution is added to them
      (``prior``, a :class:`~fedmoe.models.prior.LabelPrior` over the vocabulary, set from
      the client's DP histogram of its next-byte targets: one window adds its own
      histogram scaled to unit L2 norm, sensitivity 1,
      :func:`fedmoe.privacy.label_prior.label_counts`):
      the model starts as the client's unigram model and the shared trunk and head learn
      what the context adds to it (logit adjustment, Menon et al., ICLR 2021, here on a
      language model's output; the bias initialisation of Karpathy's "A recipe for
      training neural networks", 2019, made personal and kept out of DP-SGD's noise).
    - phase ``finetune``: ``cls_head`` on the final hidden state of the *last* position
      (causal, so it has seen the whole window), class logits (B, num_classes);
      ``task`` is :class:`~fedmoe.models.tasks.Classification` (labels (B,)).

    ``forward(x)`` takes token ids x (B, L) with 1 <= L <= ``seq_len`` and returns
    ``(outputs, aux)``, ``aux`` (B,) the sum over layers of each MoE layer's per-sample
    router losses (balance and z-loss, already weighted by their coefficients). All router
    losses are per sample, over that sample's own tokens: nothing couples the samples of a
    batch, as DP-SGD's per-sample sensitivity bound requires.

    Both heads always exist (the state dict is the same in both phases). :meth:`set_phase`
    freezes the head of the other phase, so DP noise never reaches it; it still takes part
    in the forward pass, applied to the last position and added times zero, so that a
    caller who unfreezes it gets an exact-zero per-sample gradient rather than none (Opacus'
    optimizer refuses a trainable parameter without one).

    Roles: everything is ``shared`` (embeddings, attention, layer norms, always-on and
    shared routed experts, both heads) except what :class:`~fedmoe.models.layers.TopKMoE`
    tags itself: each layer's router is ``gate`` and its local experts are ``local``; the
    unigram prior is ``local`` (a buffer: never trained, never noised, never sent).

    Attention is built from ``nn.Linear`` (one qkv and one output projection) and
    ``F.scaled_dot_product_attention(..., is_causal=True)``, not Opacus'
    ``DPMultiheadAttention``, which in Opacus 1.6 gives wrong outputs with
    ``batch_first=True`` and more than one head. The positional ids are expanded to
    (B, L) so that Opacus computes per-sample gradients for the positional embedding.
    """

    def __init__(self, config: TMoEConfig) -> None:
        super().__init__()
        set_role(self, Role.SHARED)  # the MoE layers tag their routers and local experts
        self.config = config
        d = config.hidden_dim
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.seq_len, d)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size)
        self.cls_head = nn.Linear(d, config.num_classes)
        self.prior = (LabelPrior(config.vocab_size, per_window=True) if config.unigram_prior
                      else nn.Identity())
        self.set_phase("pretrain")

    def set_phase(self, phase: str) -> None:
        """``pretrain`` (language modelling) or ``finetune`` (classification), and freeze
        what the phase does not train.

        The head of the other phase is frozen (``requires_grad = False``): DP-SGD neither
        clips nor noises it, so it keeps the values it had (the classification head
        starts fine-tuning from its initialisation, not from a random walk of pretraining
        noise). Everything else trains in both phases.

        Raises
        ------
        ValueError
            If ``phase`` is not one of :data:`PHASES`.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase
        for name, param in self.named_parameters():
            param.requires_grad_(self._trains(name))

    def _trains(self, name: str) -> bool:
        """Whether parameter ``name`` trains in the current phase."""
        idle = "cls_head" if self.phase == "pretrain" else "lm_head"
        return name.split(".", 1)[0] != idle

    @property
    def task(self) -> LanguageModel | Classification:
        return LanguageModel() if self.phase == "pretrain" else Classification()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2:
            raise ValueError(f"expected token ids (B, L), got shape {tuple(x.shape)}")
        b, n = x.shape
        if not 1 <= n <= self.config.seq_len:
            raise ValueError(f"sequence length {n} is not in [1, {self.config.seq_len}]")
        positions = torch.arange(n, device=x.device).expand(b, n).contiguous()
        h = self.tok_emb(x) + self.pos_emb(positions)  # (B, L, D)
        aux = h.new_zeros(b)
        for block in self.blocks:
            h, a = block(h)
            aux = aux + a
        h = self.ln_f(h)
        last = h[:, -1]  # (B, D)
        if self.phase == "pretrain":
            idle = self.cls_head(last).sum(dim=-1)  # (B,)
            return self.prior(self.lm_head(h)) + 0.0 * idle[:, None, None], aux  # (B, L, V)
        idle = self.lm_head(last).sum(dim=-1)  # (B,)
        return self.cls_head(last) + 0.0 * idle[:, None], aux  # (B, C)
