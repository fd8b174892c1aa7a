"""BiGR with generation: the network of `models.bigr` plus `generate`, driven by the model's own defaults."""
from __future__ import annotations

import torch

from bigr_engine.errors import BigrError
from bigr_engine.models.bigr import BiGRNetwork
from bigr_engine.models.config import BiGRConfig
from bigr_engine.sampling import engine, reference
from bigr_engine.sampling.options import SamplingOptions, paper_sampling, resolve_options
from bigr_engine.sampling.reuse import resolve_reuse

BACKENDS = ("engine", "reference")


class BiGR(BiGRNetwork):
    """The BiGR network with `generate`. `default_sampling` (a SamplingOptions) is what `generate`, the
    applications, `sample-many` and the CLI use for every option the caller leaves out: the paper's settings for
    a released size, the tuned ones for the bundled model (set by its loader)."""

    def __init__(self, cfg: BiGRConfig):
        super().__init__(cfg)
        paper = paper_sampling(cfg.dim, cfg.n_layer)   # capped to what a smaller model can take
        self.default_sampling: SamplingOptions = paper.replace(steps=min(paper.steps, cfg.train_steps),
                                                               iters=min(paper.iters, cfg.num_tokens))
        self.class_names: list[str] | None = None

    def sampling_options(self, **overrides) -> SamplingOptions:
        """The model's defaults with `overrides` (None = keep the default) on top, checked against this model."""
        return resolve_options(self, **overrides)

    def generate(self, labels, cfg: float | None = None, iters: int | None = None, steps: int | None = None,
                 gumbel: float | None = None, cfg_schedule: str | None = None, gumbel_schedule: str | None = None,
                 temperature: float | None = None, deterministic: bool | None = None, greedy: bool | None = None,
                 seed: int | None = None, order: str | None = None, sample_index=None, progress: bool = False,
                 backend: str = "engine", dtype=None, cuda_graph: bool | None = None, reuse=None,
                 seeds=None) -> torch.Tensor:
        """Class-conditional generation -> codes (B,N,K) uint8. Options left out (None) take the model's
        `default_sampling`. Sample i is keyed by (seed, sample_index[i]) (default: its position in the batch), so it
        does not depend on the rest of the batch. backend="engine" (default) is the fast path; "reference" runs the
        release's algorithm as written; both give the same codes in float32. order ("entropy" | "random" |
        "raster") picks which tokens are unmasked first; the engine implements only "entropy", so other orders run
        the reference sampler. Engine only: dtype ("float32" | "bfloat16" | "float16"; default bfloat16 on CUDA,
        float32 on CPU) is the matmul precision under autocast, probabilities stay float32; cuda_graph (default on
        CUDA) replays the whole call as a CUDA graph captured once per batch-size bucket (powers of two); reuse
        (sampling.reuse) is the state kept across iterations: "exact" (default; the same codes as "off"), or "fast"
        and explicit parameters (a dict), which are faster and change the samples; seeds (B,) gives each row its own
        seed (row b is then what seed=seeds[b] gives it; the plain loop runs when they differ)."""
        if backend not in BACKENDS:
            raise BigrError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        opts = self.sampling_options(cfg=cfg, iters=iters, steps=steps, gumbel=gumbel, cfg_schedule=cfg_schedule,
                                     gumbel_schedule=gumbel_schedule, temperature=temperature,
                                     deterministic=deterministic, greedy=greedy, seed=seed, order=order)
        extra = {} if seeds is None else {"seeds": seeds}
        return self.generate_with(labels, opts, sample_index, progress, backend, dtype=dtype, cuda_graph=cuda_graph,
                                  reuse=reuse, **extra)

    def generate_with(self, labels, opts: SamplingOptions, sample_index=None, progress: bool = False,
                      backend: str = "engine", **engine_options) -> torch.Tensor:
        """generate with checked SamplingOptions (the applications and sample-many build theirs once)."""
        labels = self.check_labels(labels)
        if sample_index is not None:
            sample_index = torch.as_tensor(sample_index, device=self.device).long().reshape(-1)
            if sample_index.shape[0] != labels.shape[0]:
                raise BigrError(f"sample_index needs one entry per label: {sample_index.shape[0]} for "
                                f"{labels.shape[0]} labels")
        if backend == "engine" and opts.order == "entropy":
            return engine.generate(self, labels, opts, sample_index, progress, **engine_options)
        if engine_options.get("seeds") is not None:
            raise BigrError("seeds= (per-row seeds) is an engine option; use backend='engine' and order='entropy'")
        if not resolve_reuse(engine_options.get("reuse")).exact:
            raise BigrError(f"reuse={engine_options['reuse']!r} changes samples and only the engine implements it "
                            f"(backend='engine', order='entropy'); use reuse='exact' or 'off' here")
        return reference.generate(self, labels, opts, sample_index, progress)
