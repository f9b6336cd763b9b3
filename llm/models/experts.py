"""Feed-forward layers: PEER (Parameter Efficient Expert Retrieval, He 2024, arXiv 2407.04153) and SwiGLU.

PEER, per token x (D) and retrieval head h:
  1. query q_h = norm(W_q x)_h (query_dim), split into P = len(product_key_dim) equal parts;
  2. part p scores its own product_key_dim[p] sub-keys: s_p = K_p q_{h,p};
  3. an expert (c_0..c_{P-1}) scores sum_p s_p[c_p]; the exact top-k over all N = prod(n_p) experts is
     found by pairwise merge-and-prune (llm/models/product_keys.py), ties to the lower flat id;
  4. mixing weights = softmax over the head's k scores (or a sigmoid per score);
  5. out = sum_h sum_k weight * v_i^T act(u_i x)  (u_i, v_i: (M, D) rows; GLU: act(u_i x) * (g_i x)),
     computed by llm/ops/peer_experts.py (Triton on CUDA, chunked torch reference elsewhere).

Query normalisation: "batchnorm" (the paper's) normalises with statistics over every position of the
batch, so in a causal LM a token's query depends (weakly) on later tokens of the batch, and train
(batch statistics) differs from eval (running averages); "layernorm" (per token, per head) has neither
issue; "none" skips it.

Shape legend: T tokens (all leading dims flattened), D model width, H heads, K experts per head,
N experts, M expert hidden size, Q query_dim, n sub-keys of one part, q = Q / P query width per part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.config.defaults import PEERConfig
from llm.config.validation import validate_peer_config
from llm.models.product_keys import retrieve_topk, subkey_scores_from_queries
from llm.ops.peer_experts import peer_experts
from llm.ops.triton_query_norm import query_layer_norm

# E[act(z)^2] for z ~ N(0, 1) (numerical integrals): the variance one active expert neuron contributes.
_ACT_SECOND_MOMENT = {"gelu": 0.4252, "relu": 0.5, "silu": 0.3557}


def _inside_backward() -> bool:
    """True while the autograd engine runs a backward pass (activation checkpointing re-runs forwards there).

    Under torch.compile the forward is traced once and checkpoint recomputation happens inside the compiled
    backward graph, so there is nothing to exclude; asking autograd would also break the graph.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class PEER(nn.Module):
    """A PEER layer: ``forward(x[..., D]) -> [..., D]``.

    Parameters: ``query`` (H*Q, D) projection, ``query_norm``, ``sub_keys`` (P tensors, (n_p, q) shared or
    (H, n_p, q) per head), expert tables ``u``, ``v`` (and ``g`` for GLU) of shape (N, M, D).
    Optimiser: ``table_parameters()`` lists the tables; ``table_param_group(lr)`` gives their group with
    ``lr * table_lr_multiplier`` and ``table_weight_decay``; every other parameter is ordinary.
    Usage: with ``log_expert_usage`` the non-persistent int64 buffer ``usage_counts`` (H, N) counts each
    head's selections in training forwards (not in eval, not in checkpoint re-computation); it is
    ``None`` otherwise.
    """

    def __init__(self, dim: int, config: PEERConfig) -> None:
        super().__init__()
        validate_peer_config(config)
        if dim < 1:
            raise ValueError(f"PEER dim: got {dim}; must be >= 1")
        self.dim = dim
        self.config = config
        self.num_heads = config.num_heads
        self.num_experts = config.num_experts
        self.k = config.num_experts_per_tok
        self.product_key_dim = list(config.product_key_dim)
        self.part_dim = config.query_dim // len(self.product_key_dim)
        H, Q, N, M = config.num_heads, config.query_dim, config.num_experts, config.expert_hidden_size

        self.query = nn.Linear(dim, H * Q, bias=False)
        if config.query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(H * Q)
        elif config.query_norm == "layernorm":
            self.query_norm = nn.LayerNorm(Q)
        else:
            self.query_norm = nn.Identity()
        lead = () if config.shared_subkeys else (H,)
        self.sub_keys = nn.ParameterList(
            [nn.Parameter(torch.empty(*lead, n, self.part_dim)) for n in self.product_key_dim]
        )
        self.u = nn.Parameter(torch.empty(N, M, dim))
        self.v = nn.Parameter(torch.empty(N, M, dim))
        self.g = nn.Parameter(torch.empty(N, M, dim)) if config.glu else None
        self.dropout = nn.Dropout(config.dropout)
        if config.log_expert_usage:
            self.register_buffer("usage_counts", torch.zeros(H, N, dtype=torch.int64), persistent=False)
        else:
            self.register_buffer("usage_counts", None, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter (all init choices live here).

        - query: N(0, 1/D), so queries of a unit-RMS input have unit variance before the norm.
        - sub-keys: N(0, 1/q), so each part's sub-key scores have unit variance for a unit-variance query.
        - u (and g): N(0, 1/D) rows, so pre-activations u_i . x are ~N(0, 1) for a unit-RMS input.
        - v: N(0, sigma^2) with sigma^2 = 1 / (D * E[act^2] * S), S = expected sum over a token's H*K*M
          active neurons of weight^2 (softmax ~ uniform: H*M/K; sigmoid: H*K*M, since the top-k of ~10^6
          scores sit several sigma up, where the sigmoid is ~1). Each output
          coordinate then starts with variance ~1/D (output norm ~1, RMS ~D^-1/2: near zero next to the
          residual stream), while v != 0 lets gradients reach u, the queries and the sub-keys from step 1.
        """
        cfg = self.config
        nn.init.normal_(self.query.weight, std=self.dim**-0.5)
        for keys in self.sub_keys:
            nn.init.normal_(keys, std=self.part_dim**-0.5)
        nn.init.normal_(self.u, std=self.dim**-0.5)
        if self.g is not None:
            nn.init.normal_(self.g, std=self.dim**-0.5)
        H, K, M = cfg.num_heads, cfg.num_experts_per_tok, cfg.expert_hidden_size
        sum_sq_weights = H * M / K if cfg.score_fn == "softmax" else H * K * M
        second_moment = _ACT_SECOND_MOMENT[cfg.activation]
        nn.init.normal_(self.v, std=1.0 / math.sqrt(self.dim * second_moment * sum_sq_weights))
        if isinstance(self.query_norm, (nn.LayerNorm, nn.BatchNorm1d)):
            self.query_norm.reset_parameters()

    # ----------------------------------------------------------------------------------- retrieval
    def _queries(self, x: Tensor) -> Tensor:
        """x [..., D] -> normalised queries (T, H, Q) in >= fp32 (T = all leading dims flattened)."""
        H, Q = self.num_heads, self.config.query_dim
        q_TF = self.query(x.reshape(-1, self.dim))  # (T, H*Q)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q_TF = self.query_norm(q_TF)  # statistics over all T positions (see module docstring)
        q_THQ = q_TF.view(-1, H, Q)
        # Scores in >= fp32 even under bf16 autocast: bf16's 8-bit mantissa would tie many of the
        # sub-key scores and change which experts win (the einsums are small next to the experts).
        # The LayerNorm writes fp32 itself (one fused kernel on CUDA, no bf16 rounding of the queries).
        if isinstance(self.query_norm, nn.LayerNorm):
            norm = self.query_norm
            return query_layer_norm(q_THQ, norm.weight, norm.bias, norm.eps, self.config.kernel)
        return q_THQ.to(torch.promote_types(q_THQ.dtype, torch.float32))

    def _sub_keys(self, dtype: torch.dtype) -> list[Tensor]:
        return [keys.to(dtype) for keys in self.sub_keys]

    def subkey_scores(self, x: Tensor) -> list[Tensor]:
        """Sub-key scores per part: x [..., D] -> P tensors [..., H, product_key_dim[p]].

        An expert's retrieval score (what ``retrieve`` returns) is the sum of its coordinates' entries.
        """
        lead = x.shape[:-1]
        q_THQ = self._queries(x)
        scores = subkey_scores_from_queries(q_THQ, self._sub_keys(q_THQ.dtype))
        return [s_THn.reshape(*lead, self.num_heads, s_THn.shape[-1]) for s_THn in scores]

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k experts per head: x [..., D] -> (scores, indices), each [..., H, K].

        ``scores`` are the raw retrieval scores (sums of sub-key scores, before softmax/sigmoid), sorted
        descending per head, ties to the lower id; ``indices`` are int64 flat expert ids in [0, N),
        row-major over ``product_key_dim``. Scores are differentiable w.r.t. the query path and sub-keys;
        the backward touches only the selected sub-keys (``retrieve_topk``). On CUDA, two parts run as two
        fused Triton kernels (``llm/ops/triton_retrieval.py``); other part counts run the per-part top-k
        and merge kernels (``product_topk``).
        """
        lead = x.shape[:-1]
        q_THQ = self._queries(x)
        use_kernels = self.config.kernel != "torch"
        scores_THK, ids_THK = retrieve_topk(q_THQ, self._sub_keys(q_THQ.dtype), self.k, use_kernels)
        return scores_THK.reshape(*lead, self.num_heads, self.k), ids_THK.reshape(*lead, self.num_heads, self.k)

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]: the sum over heads of each head's weighted retrieved experts."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"PEER: input width {x.shape[-1]} != dim={self.dim}")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.dim)
        scores_THK, idx_THK = self.retrieve(x_TD)
        # Mixing weights in at least fp32 even under bf16 autocast (k-way softmax is cheap).
        scores_THK = scores_THK.to(torch.promote_types(scores_THK.dtype, torch.float32))
        if self.config.score_fn == "softmax":
            weights_THK = scores_THK.softmax(dim=-1)
        else:
            weights_THK = torch.sigmoid(scores_THK)
        if self.usage_counts is not None and self.training and not _inside_backward():
            self._count_usage(idx_THK)
        out_TD = peer_experts(
            x_TD,
            idx_THK,
            weights_THK,
            self.u,
            self.v,
            self.config.activation,
            g=self.g,
            kernel=self.config.kernel,
            max_gather_bytes=self.config.max_gather_mib * 2**20,
            sparse_grad=self.config.table_optimizer == "sparse_adam",
        )
        return self.dropout(out_TD).view(*lead, self.dim)

    @torch.no_grad()
    def _count_usage(self, idx_THK: Tensor) -> None:
        """usage_counts[h, i] += selections of expert i by head h; on device, no host sync."""
        H, N = self.num_heads, self.num_experts
        head_offset_H1 = torch.arange(H, device=idx_THK.device).unsqueeze(-1) * N  # (H, 1)
        flat = (idx_THK + head_offset_H1).reshape(-1)
        self.usage_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    # ----------------------------------------------------------------------------------- optimiser
    def table_parameters(self) -> list[nn.Parameter]:
        """The expert tables (u, v and g for GLU): the bulk of the parameters, updated row-sparsely."""
        return [p for p in (self.u, self.v, self.g) if p is not None]

    def table_param_group(self, lr: float) -> dict:
        """Optimiser group for the tables: ``lr * table_lr_multiplier``, ``table_weight_decay``.

        The public PEER code raises the tables' learning rate (x4-x10) and keeps them out of the weight
        decay chosen for dense matrices; the trainer puts every other parameter in its usual groups.
        """
        return {
            "params": self.table_parameters(),
            "lr": lr * self.config.table_lr_multiplier,
            "weight_decay": self.config.table_weight_decay,
            "name": "peer_tables",
        }

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, num_experts={c.num_experts}, product_key_dim={c.product_key_dim}, "
            f"heads={c.num_heads}, k={c.num_experts_per_tok}, expert_hidden_size={c.expert_hidden_size}, "
            f"activation={c.activation}{'+glu' if c.glu else ''}, score_fn={c.score_fn}, kernel={c.kernel}"
        )


class SwiGLU(nn.Module):
    """Dense gated FFN (DeepSeek's names): ``w2(silu(w1 x) * w3 x)``; x [..., D] -> [..., D].

    Linear layers keep torch's default init; the decoder re-initialises them with its own std.
    """

    def __init__(self, dim: int, hidden_size: int) -> None:
        super().__init__()
        if dim < 1 or hidden_size < 1:
            raise ValueError(f"SwiGLU: dim={dim} and hidden_size={hidden_size} must be >= 1")
        self.w1 = nn.Linear(dim, hidden_size, bias=False)
        self.w2 = nn.Linear(hidden_size, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
