"""The BiGR network: the transformer (conditions) + the transcoder (bits), with checks on user input.

`sampling.BiGR` adds generation on top; this module knows nothing of samplers."""
from __future__ import annotations

import torch
from torch import nn

from bigr_engine.models.classes import class_ids
from bigr_engine.models.config import BiGRConfig
from bigr_engine.errors import BigrError
from bigr_engine.models.transcoder import Transcoder
from bigr_engine.ops.reference import schedule_tables
from bigr_engine.models.transformer import Transformer


# The paper's representation layers (1-based 10 / 15 / 32) per released size, keyed by (dim, layers), 0-based.
PAPER_LAYERS = {(1024, 24): 9, (1280, 36): 14, (1536, 48): 31}


class BiGRNetwork(nn.Module):
    def __init__(self, cfg: BiGRConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.transcoder = Transcoder(cfg.bits, cfg.dim, cfg.transcoder_dim, cfg.transcoder_blocks)
        self._tables = {}

    @property
    def device(self) -> torch.device:
        return self.transformer.tok_embeddings.weight.device

    def schedule(self, device=None) -> dict:
        """Schedule tables (k_final, b_final, beta, cumbeta), float32, T+1 entries, on `device`."""
        device = torch.device(device or self.device)
        if device not in self._tables:
            self._tables[device] = {k: v.to(device) for k, v in schedule_tables(self.cfg.train_steps).items()}
        return self._tables[device]

    # ---- checks on user input -------------------------------------------------------------
    def check_labels(self, labels) -> torch.Tensor:
        """Class ids, class names (["Sneaker", "Bag"], as the CLI takes them), or (B, C+1) class weights. A text model:
        prompts (encoded by its `text_encoder`) or condition tensors (B, L, 1 + text_dim) (models.text)."""
        if self.cfg.is_text:
            return self._check_text(labels)
        if isinstance(labels, str):
            labels = [labels]
        if isinstance(labels, (list, tuple)) and any(isinstance(x, str) for x in labels):
            labels = class_ids(labels, self)
        labels = torch.as_tensor(labels, device=self.device)
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[1] != self.cfg.num_classes + 1:
                raise BigrError(f"class weights must be (B, {self.cfg.num_classes + 1}), got {tuple(labels.shape)}")
            return labels
        labels = labels.long().reshape(-1)
        bad = labels[(labels < 0) | (labels > self.cfg.num_classes)]
        if bad.numel():
            raise BigrError(f"class id {int(bad[0])} is out of range: this model has classes 0..{self.cfg.num_classes - 1} "
                            f"(and {self.cfg.num_classes} for the null class)")
        return labels

    def _check_text(self, labels) -> torch.Tensor:
        L, dim = self.cfg.text_tokens, self.cfg.text_dim
        if isinstance(labels, str) or (isinstance(labels, (list, tuple)) and labels and
                                       all(isinstance(p, str) for p in labels)):
            encoder = getattr(self, "text_encoder", None)
            if encoder is None:
                raise BigrError("this text model has no text encoder attached; load it with its encoder "
                                "(model.text_encoder = models.text.load_text_encoder(...)) or pass condition tensors")
            from bigr_engine.models.text import pack_condition
            emb, mask = encoder([labels] if isinstance(labels, str) else list(labels))
            labels = pack_condition(emb, mask)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.shape[1:] != (L, 1 + dim):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise BigrError(f"a text model takes prompts (strings) or condition tensors (B, {L}, {1 + dim}) from "
                            f"models.text.pack_condition, got {got}")
        return labels.to(self.device, torch.float32)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The null condition of `batch` rows: the null class, or a text model's empty prompt."""
        if self.cfg.is_text:
            return self.transformer.null_text.expand(batch, -1, -1)
        return torch.full((batch,), self.cfg.null_class, dtype=torch.long)

    def check_codes(self, codes, mask=None):
        N, K = self.cfg.num_tokens, self.cfg.bits
        if codes.dim() != 3 or codes.shape[1:] != (N, K):
            raise BigrError(f"codes must be (B, {N}, {K}) for this model ({N} tokens of {K} bits), got {tuple(codes.shape)}")
        if mask is not None and mask.shape != codes.shape[:2]:
            raise BigrError(f"mask must be (B, {N}) booleans, got {tuple(mask.shape)}")

    # ---- the network's API -----------------------------------------------------------------
    def condition(self, codes, mask, labels) -> torch.Tensor:
        """(B,N,K) 0/1 codes, (B,N) bool mask (True = masked), (B,) labels -> transcoder conditions (B,N,D)."""
        self.check_codes(codes, mask)
        return self.transformer.conditions(codes, mask.bool(), self.check_labels(labels))

    def transcoder_logits(self, x_t, t, z) -> torch.Tensor:
        """(M,K) 0/1, (M,) steps in 1..T, (M,D) conditions -> (M,K) flip logits."""
        t = torch.as_tensor(t, device=self.device).long()
        if bool(((t < 1) | (t > self.cfg.train_steps)).any()):
            raise BigrError(f"transcoder steps must be in 1..{self.cfg.train_steps}")
        return self.transcoder(x_t, t, z)

    def token_features(self, codes, layer: int, labels=None) -> torch.Tensor:
        """Per-token residual stream after blocks 0..layer (inclusive), no final norm: (B,N,D)."""
        self.check_codes(codes)
        if not 0 <= layer < self.cfg.n_layer:
            raise BigrError(f"layer {layer} is out of range: this model has layers 0..{self.cfg.n_layer - 1}")
        if labels is None:
            labels = self.null_condition(codes.shape[0])
        mask = torch.zeros(codes.shape[:2], dtype=torch.bool, device=self.device)
        out = self.transformer(codes.to(self.device), mask, self.check_labels(labels), last_layer=layer)
        return out[:, self.cfg.cond_tokens:]

    def default_layer(self) -> int:
        """The representation layer (0-based) used when none is given: the paper's for the released sizes (its 10th,
        15th and 32nd layers of L, XL and XXL), the middle block otherwise (the best probe layer of the bundled
        model: bench/results/default-model/quality.md)."""
        return PAPER_LAYERS.get((self.cfg.dim, self.cfg.n_layer), self.cfg.n_layer // 2)

    def representation(self, codes, layer: int | None = None, labels=None) -> torch.Tensor:
        """Pooled features (B,D): mean over tokens of `token_features` after blocks 0..layer (default:
        `default_layer()`); labels=None uses the null class."""
        return self.token_features(codes, self.default_layer() if layer is None else layer, labels).mean(1)
