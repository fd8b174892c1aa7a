"""Sampling options, their one validation, the defaults a model carries, and the schedules (spec section 4).

Every entry point (`BiGR.generate`, the applications, `sample-many`, the CLI) builds its options with
`resolve_options`: the model's own defaults (`model.default_sampling`), then the caller's overrides, then
`SamplingOptions.check` against the model's shape. Nothing else validates sampling options.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bigr_engine.errors import BigrError

CFG_SCHEDULES = ("constant", "linear")
GUMBEL_SCHEDULES = ("constant", "down", "up")
ORDERS = ("entropy", "random", "raster")   # which masked tokens are unmasked first (paper's ablation, table 4)
MASK_SCHEDULES = ("cosine", "linear")       # generation / in- and outpainting


@dataclass(frozen=True)
class SamplingOptions:
    cfg: float = 2.5
    iters: int = 20
    steps: int = 100
    gumbel: float = 0.0
    cfg_schedule: str = "constant"
    gumbel_schedule: str = "constant"
    temperature: float = 1.0
    deterministic: bool = False   # token bits are p0 > 0.5 (the transcoder still samples)
    greedy: bool = False          # every Bernoulli draw is its mode, no Gumbel noise
    seed: int = 0
    order: str = "entropy"        # "entropy": most confident first; "random": keyed uniform; "raster": lowest position first

    def replace(self, **changes) -> "SamplingOptions":
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise BigrError(f"unknown sampling option(s) {', '.join(unknown)}; valid ones are {', '.join(OPTION_NAMES)}")
        return dataclasses.replace(self, **changes)

    def check(self, num_tokens: int, train_steps: int) -> "SamplingOptions":
        """Every option's range, for a model of `num_tokens` tokens trained with `train_steps` steps; -> self."""
        for name, choices in (("cfg_schedule", CFG_SCHEDULES), ("gumbel_schedule", GUMBEL_SCHEDULES), ("order", ORDERS)):
            if getattr(self, name) not in choices:
                raise BigrError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("cfg", "gumbel", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BigrError(f"{name} must be a finite number, got {v!r}")
        for name in ("iters", "steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise BigrError(f"{name} must be an integer, got {v!r}")
        if not 1 <= self.iters <= num_tokens:
            raise BigrError(f"iters must be in 1..{num_tokens} (the token count), got {self.iters}")
        if not 1 <= self.steps <= train_steps:
            raise BigrError(f"steps must be in 1..{train_steps} (the training steps), got {self.steps}")
        if self.temperature <= 0:
            raise BigrError(f"temperature must be positive, got {self.temperature}")
        if self.cfg < 0 or self.gumbel < 0:
            raise BigrError(f"cfg and gumbel must be non-negative, got cfg={self.cfg}, gumbel={self.gumbel}")
        if not 0 <= self.seed < 2 ** 63:
            raise BigrError(f"seed must be in 0..2^63-1, got {self.seed}")
        return self


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SamplingOptions))

# The paper's settings per released model size (spec: CFG 2.5, 20 iterations for L and 25 for XL/XXL, Gumbel
# 0.17/0.25/0.30, 100 transcoder steps), keyed by (dim, layers).
PAPER_SAMPLING = {
    (1024, 24): SamplingOptions(cfg=2.5, iters=20, steps=100, gumbel=0.17),
    (1280, 36): SamplingOptions(cfg=2.5, iters=25, steps=100, gumbel=0.25),
    (1536, 48): SamplingOptions(cfg=2.5, iters=25, steps=100, gumbel=0.30),
}


def paper_sampling(dim: int, n_layer: int) -> SamplingOptions:
    """The paper's sampling settings for a released size; the library's generic ones (SamplingOptions()) otherwise."""
    return PAPER_SAMPLING.get((dim, n_layer), SamplingOptions())


def as_options(value) -> SamplingOptions:
    """A SamplingOptions from a SamplingOptions or a dict of its fields (as bundled models store them)."""
    if isinstance(value, SamplingOptions):
        return value
    return SamplingOptions().replace(**dict(value or {}))


def resolve_options(model, **overrides) -> SamplingOptions:
    """The model's defaults (`model.default_sampling`), the overrides that are not None on top, checked."""
    base = as_options(getattr(model, "default_sampling", None))
    opts = base.replace(**{k: v for k, v in overrides.items() if v is not None})
    return opts.check(model.cfg.num_tokens, model.cfg.train_steps)


# ---------------------------------------------------------------------------------------------- schedules

def masked_after(iteration: int, iters: int, num_masked: int, schedule: str = "cosine") -> int:
    """How many of `num_masked` initially masked tokens stay masked after iteration s (0-based):
    floor(cos(pi/2 * (s+1)/iters) * n) for generation, floor((1 - (s+1)/iters) * n) for in/outpainting."""
    ratio = (iteration + 1) / iters
    rate = math.cos(math.pi / 2 * ratio) if schedule == "cosine" else 1 - ratio
    return math.floor(rate * num_masked)


def cfg_at(opts: SamplingOptions, ratio: float) -> float:
    return opts.cfg if opts.cfg_schedule == "constant" else 1 + (opts.cfg - 1) * ratio


def gumbel_at(opts: SamplingOptions, ratio: float) -> float:
    if opts.greedy:
        return 0.0
    return {"constant": opts.gumbel, "down": opts.gumbel * (1 - ratio), "up": opts.gumbel * ratio}[opts.gumbel_schedule]


@dataclass(frozen=True)
class Round:
    iteration: int     # keys the round's random streams
    n: int             # masked tokens before the round (all of them go through the transcoder)
    count: int         # tokens unmasked by the round
    cfg: float
    gumbel: float


def rounds_for(opts: SamplingOptions, N: int) -> list[Round]:
    """The unmasking plan of a full generation: fixed by the options, the same for every row."""
    out, n = [], N
    for s in range(opts.iters):
        ratio = (s + 1) / opts.iters
        keep = masked_after(s, opts.iters, N)
        out.append(Round(s, n, n - keep, cfg_at(opts, ratio), gumbel_at(opts, ratio)))
        n = keep
    if n:  # one more pass fills whatever is left (the cosine schedule normally ends at 0)
        out.append(Round(opts.iters, n, n, opts.cfg, 0.0))
    return [r for r in out if r.n > 0]
