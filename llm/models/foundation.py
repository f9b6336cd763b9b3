"""The decoder: token embedding, blocks of MLA + (dense SwiGLU | PEER) FFN, final norm, LM head.

Each block is pre-norm: ``x += attn(attn_norm(x)); x += ffn(ffn_norm(x))``. Which blocks use PEER
is ``peer_layer_indices(model_config)`` (the paper replaced only some FFNs with PEER).

Construct under ``with torch.device("meta"):`` to inspect a configuration with millions of experts
without allocating memory; ``llm/utils/eval/size.py`` counts parameters from the config alone and
its tests check it against this module.

Shapes: B batch, T tokens, D model width, V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.config.defaults import ModelConfig, peer_layer_indices
from llm.config.validation import validate_model_config
from llm.models.attention import MultiHeadLatentAttention, as_document_mask
from llm.models.experts import PEER, SwiGLU
from llm.models.norm import RMSNorm

IGNORE_INDEX = -100  # labels with this value take no part in the loss (padding)


class Block(nn.Module):
    """Pre-norm residual block: MLA, then a dense SwiGLU or a PEER FFN."""

    def __init__(self, model_config: ModelConfig, use_peer: bool) -> None:
        super().__init__()
        d = model_config.dim
        self.attn_norm = RMSNorm(d, model_config.norm_eps)
        self.attn = MultiHeadLatentAttention(d, model_config.mla_config, model_config.max_seq_len)
        self.ffn_norm = RMSNorm(d, model_config.norm_eps)
        self.ffn: nn.Module = PEER(d, model_config.peer_config) if use_peer else SwiGLU(d, model_config.ffn_hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: object | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); ``positions``, ``cache``, ``doc_ids`` as in MultiHeadLatentAttention."""
        x = x + self.attn(self.attn_norm(x), positions=positions, cache=cache, doc_ids=doc_ids)
        return x + self.ffn(self.ffn_norm(x))


class FoundationModel(nn.Module):
    """Decoder-only language model with MLA attention and dense or PEER FFNs.

    Args:
        model_config: the ``model_config`` section; validated here so a config built in Python
            gets the same ``ConfigError`` messages as a YAML one.
    """

    def __init__(self, model_config: ModelConfig) -> None:
        super().__init__()
        validate_model_config(model_config)
        self.config = model_config
        self.peer_layers = peer_layer_indices(model_config)
        peer_set = set(self.peer_layers)
        self.embed = nn.Embedding(model_config.vocab_size, model_config.dim)
        self.layers = nn.ModuleList(Block(model_config, i in peer_set) for i in range(model_config.num_layers))
        self.norm = RMSNorm(model_config.dim, model_config.norm_eps)
        self.head = nn.Linear(model_config.dim, model_config.vocab_size, bias=False)
        if model_config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every initialisation choice of the model, in one place.

        - Embedding and every linear weight outside PEER: N(0, init_std), biases 0 (GPT-2 /
          nanoGPT). With tied embeddings the shared matrix gets the embedding's init.
        - Residual output projections (attention ``wo``, dense FFN down projection): N(0,
          init_std / sqrt(2 * num_layers)), so the residual stream's variance does not grow with
          depth (GPT-2 section 2.3: 2 residual branches per block).
        - RMSNorm gains: 1.
        - PEER layers: their own ``reset_parameters`` (u rows of variance 1/D, v scaled so each
          output coordinate starts with variance ~1/D, see ``llm/models/experts.py``). That output
          is already small next to the residual stream, so the 1/sqrt(2L) rule is not applied on top.
        """
        if self.embed.weight.is_meta:
            return  # nothing to fill; and meta normal_ would import torch._dynamo (~1.5 s)
        cfg = self.config
        std = cfg.init_std
        residual_std = std / math.sqrt(2 * cfg.num_layers)
        peer_params = {id(p) for _, peer in self.peer_modules() for p in peer.parameters()}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in peer_params:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            nn.init.normal_(block.attn.wo.weight, mean=0.0, std=residual_std)
            if isinstance(block.ffn, PEER):
                block.ffn.reset_parameters()
            else:
                nn.init.normal_(block.ffn.w2.weight, mean=0.0, std=residual_std)

    # ------------------------------------------------------------------------------------
    # Forward, loss
    # ------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        caches: list | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits of the next token at every position (or, with ``labels``, the loss: see ``loss``).

        Args:
            input_ids: (B, T) int64 token ids.
            doc_ids: (B, T) document ids of packed sequences; tokens attend only within their
                document when ``mla_config.document_masking`` is on.
            caches: one latent cache per block from ``make_caches``; the tokens are appended to
                them and attend to everything cached before (incremental decoding).
            labels: (B, T) targets; when given, returns ``loss``'s (loss, parts) instead of logits, so
                the whole loss runs inside this forward (FSDP's hooks gather the head for it).
        Returns:
            (B, T, V) logits in the dtype of the computation.
        """
        hidden = self._hidden_states(input_ids, doc_ids, caches)  # (B, T, D)
        if labels is not None:
            return self._chunked_loss(hidden.flatten(0, 1), labels.reshape(-1))
        return self.head(hidden)  # (B, T, V)

    def _hidden_states(
        self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, caches: list | None = None
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) final-normed hidden states (what the LM head reads)."""
        if not self.config.mla_config.document_masking:
            doc_ids = None  # loaders always send doc_ids; the config decides whether they mask
        doc_mask = as_document_mask(doc_ids)  # built once, shared by every block
        x = self.embed(input_ids)  # (B, T, D)
        for i, block in enumerate(self.layers):
            x = block(x, cache=None if caches is None else caches[i], doc_ids=doc_mask)
        return self.norm(x)

    def loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token cross-entropy (+ ``z_loss`` x mean logsumexp^2), in fp32.

        Args:
            input_ids: (B, T) int64; labels: (B, T) int64 target of each position (already
                shifted by the data loader), ``-100`` = ignored; doc_ids: as in ``forward``.
        Returns:
            (scalar loss, {"ce": scalar, "z_loss": scalar}) with the parts detached. The z-loss
            (PaLM, Chowdhery et al. 2022, section 5) keeps the softmax normaliser near 1, which
            stabilises bf16 training; it is computed over non-ignored positions only.
        """
        return self(input_ids, doc_ids=doc_ids, labels=labels)

    def _chunked_loss(self, hidden_ND: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B*T, D) hidden states, (B*T,) labels -> ``loss``'s result, ``loss_chunk_tokens`` at a time."""
        chunk = self.config.loss_chunk_tokens or hidden_ND.shape[0]
        ce_sum = z_sum = hidden_ND.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden_ND.shape[0], chunk):
            h, y = hidden_ND[start : start + chunk], labels_N[start : start + chunk]
            if chunk < hidden_ND.shape[0] and torch.is_grad_enabled():
                # Recompute this chunk's logits in backward instead of keeping them.
                parts = checkpoint(self._loss_sums, h, y, use_reentrant=False)
            else:
                parts = self._loss_sums(h, y)
            ce_sum, z_sum = ce_sum + parts[0], z_sum + parts[1]
        # Masked count rather than boolean indexing: indexing would sync with the host every step.
        tokens = (labels_N != IGNORE_INDEX).sum().clamp_min(1).float()
        ce, z = ce_sum / tokens, z_sum / tokens
        loss = ce + self.config.z_loss * z if self.config.z_loss > 0 else ce
        return loss, {"ce": ce.detach(), "z_loss": z.detach()}

    def _loss_sums(self, hidden_ND: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        """(N, D) hidden states, (N,) labels -> [sum of cross-entropies, sum of logsumexp^2], fp32."""
        logits_NV = self.head(hidden_ND).float()
        ce_sum = F.cross_entropy(logits_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
        if self.config.z_loss > 0:
            keep = (labels_N != IGNORE_INDEX).float()
            z_sum = (torch.logsumexp(logits_NV, dim=-1).pow(2) * keep).sum()
        else:
            z_sum = torch.zeros_like(ce_sum)
        return torch.stack([ce_sum, z_sum])

    # ------------------------------------------------------------------------------------
    # Helpers for trackers, optimisers and generation
    # ------------------------------------------------------------------------------------

    def peer_modules(self) -> list[tuple[int, PEER]]:
        """(block index, PEER layer) for every PEER block, in order."""
        return [(i, block.ffn) for i, block in enumerate(self.layers) if isinstance(block.ffn, PEER)]

    def make_caches(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> list:
        """One empty latent KV cache per block for ``batch_size`` sequences of up to ``max_len`` tokens."""
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        return [block.attn.make_cache(batch_size, max_len, device, dtype) for block in self.layers]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_ids=(),
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Sample continuations of a batch of prompts; see ``llm.models.generation.generate``."""
        from llm.models.generation import generate

        return generate(
            self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_ids=stop_ids, use_cache=use_cache, generator=generator,
        )

    # ------------------------------------------------------------------------------------
    # Saving and exporting (llm/models/hf_export.py)
    # ------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (any model, PEER included)."""
        from llm.models.hf_export import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> FoundationModel:
        """Load a model written by ``save_pretrained``."""
        from llm.models.hf_export import from_pretrained

        return from_pretrained(directory, map_location)

    def export_hf(self, directory: str | Path) -> Path:
        """Write Hugging Face DeepseekV3 format (models whose FFNs are all dense)."""
        from llm.models.hf_export import export_hf

        return export_hf(self, directory)
