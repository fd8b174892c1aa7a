"""BiGR = transformer (conditions) + transcoder (bits), with the public API of the engine."""
from __future__ import annotations

import torch
from torch import nn

from . import engine, sampler
from .config import BiGRConfig
from .errors import BigrError
from .transcoder import Transcoder, schedule_tables
from .transformer import Transformer


class BiGR(nn.Module):
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

    def check_codes(self, codes, mask=None):
        N, K = self.cfg.num_tokens, self.cfg.bits
        if codes.dim() != 3 or codes.shape[1:] != (N, K):
            raise BigrError(f"codes must be (B, {N}, {K}) for this model ({N} tokens of {K} bits), got {tuple(codes.shape)}")
        if mask is not None and mask.shape != codes.shape[:2]:
            raise BigrError(f"mask must be (B, {N}) booleans, got {tuple(mask.shape)}")

    # ---- public API -------------------------------------------------------------------------
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
            labels = torch.full((codes.shape[0],), self.cfg.null_class, dtype=torch.long)
        mask = torch.zeros(codes.shape[:2], dtype=torch.bool, device=self.device)
        return self.transformer(codes.to(self.device), mask, self.check_labels(labels), last_layer=layer)[:, 1:]

    def representation(self, codes, layer: int, labels=None) -> torch.Tensor:
        """Pooled features (B,D): mean over tokens of `token_features`; labels=None uses the null class."""
        return self.token_features(codes, layer, labels).mean(1)

    def generate(self, labels, cfg: float = 2.5, iters: int = 20, steps: int = 100, gumbel: float = 0.0,
                 cfg_schedule: str = "constant", gumbel_schedule: str = "constant", temperature: float = 1.0,
                 deterministic: bool = False, greedy: bool = False, seed: int = 0,
                 sample_index=None, progress: bool = False, backend: str = "engine",
                 order: str = "entropy", dtype=None, cuda_graph: bool | None = None) -> torch.Tensor:
        """Class-conditional generation -> codes (B,N,K) uint8. Sample i is keyed by (seed, sample_index[i])
        (default: its position in the batch), so it does not depend on the rest of the batch.
        backend="engine" (default) is the fast path; "reference" runs the release's algorithm as written.
        Both give the same codes for the same seed. order ("entropy" | "random" | "raster") picks which tokens
        are unmasked first; the engine implements only "entropy", so other orders run the reference sampler.
        Engine only: dtype ("float32" | "bfloat16" | "float16"; default bfloat16 on CUDA, float32 on CPU) is the
        matmul precision under autocast, probabilities stay float32; cuda_graph (default on CUDA) replays the whole
        call as a CUDA graph captured once per batch-size bucket (powers of two)."""
        if backend not in ("engine", "reference"):
            raise BigrError(f"backend must be 'engine' or 'reference', got {backend!r}")
        labels = self.check_labels(labels)
        if cfg_schedule not in sampler.CFG_SCHEDULES:
            raise BigrError(f"cfg_schedule must be one of {sampler.CFG_SCHEDULES}, got {cfg_schedule!r}")
        if gumbel_schedule not in sampler.GUMBEL_SCHEDULES:
            raise BigrError(f"gumbel_schedule must be one of {sampler.GUMBEL_SCHEDULES}, got {gumbel_schedule!r}")
        if not 1 <= iters <= self.cfg.num_tokens:
            raise BigrError(f"iters must be in 1..{self.cfg.num_tokens} (the token count), got {iters}")
        if not 1 <= steps <= self.cfg.train_steps:
            raise BigrError(f"steps must be in 1..{self.cfg.train_steps} (the training steps), got {steps}")
        if temperature <= 0:
            raise BigrError(f"temperature must be positive, got {temperature}")
        if order not in sampler.ORDERS:
            raise BigrError(f"order must be one of {sampler.ORDERS}, got {order!r}")
        if gumbel < 0 or cfg < 0:
            raise BigrError("cfg and gumbel must be non-negative")
        if sample_index is not None:
            sample_index = torch.as_tensor(sample_index, device=self.device).long().reshape(-1)
            if sample_index.shape[0] != labels.shape[0]:
                raise BigrError("sample_index needs one entry per label")
        opts = sampler.SamplingOptions(cfg=cfg, iters=iters, steps=steps, gumbel=gumbel, cfg_schedule=cfg_schedule,
                                       gumbel_schedule=gumbel_schedule, temperature=temperature,
                                       deterministic=deterministic, greedy=greedy, seed=seed, order=order)
        if backend == "engine" and order == "entropy":
            return engine.generate(self, labels, opts, sample_index, progress, dtype=dtype, cuda_graph=cuda_graph)
        return sampler.generate(self, labels, opts, sample_index, progress)
