"""State reuse across the engine's iterations: what a round may take from the rounds before it.

Between two iterations of entropy-ordered generation only the tokens unmasked by the last round change their input;
everything else changes only through attention. Two tiers use that:

- exact (the default): the layer-0 attention projections of a token depend on nothing but its own input (its code or
  the mask token, the class adaLN; a text token's embedding), so they are kept from round to round and recomputed
  only for the tokens the last round unmasked. Same codes as no reuse, bit for bit (every op involved is per row).
- approximate (`cache=True`, the "fast" preset): a cached round recomputes only an *active set* of sequence rows (a
  class model's condition token, the tokens unmasked by the last round, and the `active` x (this round's unmask
  count) still-masked tokens that the last prediction found most confident: those this round is about to decide);
  every other row keeps its per-layer keys and values from the round that last computed it (a K/V cache, attended
  through `Kernels.attention_cached`), and a masked token outside the active set keeps its last transcoder p0 and
  skips the transcoder, which is most of the work. The first `warmup` rounds and every `refresh`-th are full (exact)
  rounds; `sweep` adds to each cached round's set the masked tokens whose p0 is oldest.
  This changes samples: its cost in quality on the bundled model is measured by bench/reuse.py.
  A text model's L text tokens go through the same cache: a cached round keeps their keys and values from the last
  full round (recomputing all L rows would cost more than the active set itself), and the key mask keeps their
  padding out of every round's attention.

Every size is fixed by the options ahead of the loop (as the unmask counts are), so shapes stay static, nothing waits
on the host, and a call with reuse is captured as a CUDA graph like one without.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from bigr_engine.errors import BigrError
from bigr_engine.ops.reference import apply_rope
from bigr_engine.sampling.reference import confidence


@dataclass(frozen=True)
class Reuse:
    preset: str = "custom"    # the name it was built from (reports)
    layer0: bool = True       # exact: keep the layer-0 projections of unchanged tokens
    cache: bool = False       # approximate: cached rounds recompute only the active set
    warmup: int = 1           # the first rounds run full (at least 1: it fills the caches)
    refresh: int = 0          # every refresh-th round after the warm-up runs full; 0: never
    active: float = 2.0       # masked tokens recomputed per cached round: ceil(active * that round's unmask count)
    sweep: int = 0            # cached rounds also recompute this many of the masked tokens whose p0 is oldest

    @property
    def exact(self) -> bool:
        """Whether codes equal those without reuse."""
        return not self.cache

    def replace(self, **changes) -> "Reuse":
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise BigrError(f"unknown reuse parameter(s) {', '.join(unknown)}; valid ones are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes).check()

    def check(self) -> "Reuse":
        for name in ("warmup", "refresh", "sweep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BigrError(f"reuse {name} must be a non-negative integer, got {v!r}")
        if self.cache and self.warmup < 1:
            raise BigrError("reuse warmup must be at least 1 with cache=True: the first round fills the caches")
        if isinstance(self.active, bool) or not isinstance(self.active, (int, float)) or not self.active >= 1:
            raise BigrError(f"reuse active must be a number >= 1 (a multiple of each round's unmask count), "
                            f"got {self.active!r}")
        return self


FIELDS = tuple(f.name for f in dataclasses.fields(Reuse))

PRESETS = {
    "off": Reuse("off", layer0=False),
    "exact": Reuse("exact"),
    # chosen on the bundled model by bench/reuse.py (README: 2.3x the exact engine, accuracy and FD within the bounds)
    "fast": Reuse("fast", cache=True, warmup=1, refresh=4, active=2.0),
}
DEFAULT = "exact"


def resolve_reuse(value) -> Reuse:
    """None (the default, "exact"), a preset name, a Reuse, or a dict of Reuse fields (on top of its "preset", default
    "exact"); e.g. {"preset": "fast", "active": 3}."""
    if value is None:
        return PRESETS[DEFAULT]
    if isinstance(value, Reuse):
        return value.check()
    if isinstance(value, str):
        if value not in PRESETS:
            raise BigrError(f"unknown reuse preset {value!r}; choose from {', '.join(PRESETS)} "
                            f"(or pass a dict of parameters: {', '.join(FIELDS[1:])})")
        return PRESETS[value]
    if isinstance(value, dict):
        params = dict(value)
        base = resolve_reuse(params.pop("preset", DEFAULT))
        return base.replace(preset=f"{base.preset}+" + ",".join(f"{k}={v}" for k, v in sorted(params.items())),
                            **params) if params else base
    raise BigrError(f"reuse must be a preset name ({', '.join(PRESETS)}), a dict of parameters or a Reuse, "
                    f"got {type(value).__name__}")


@dataclass(frozen=True)
class RoundReuse:
    full: bool       # every row through the transformer, every masked token through the transcoder
    changed: int     # tokens the previous round unmasked (their inputs changed)
    stale: int       # full rounds: tokens unmasked since the last full round (their layer-0 projections are stale)
    active: int      # cached rounds: masked tokens recomputed (the rest keep their p0)
    sweep: int = 0   # cached rounds: of the others, the oldest this many are recomputed too


def plan_reuse(reuse: Reuse, rounds: list) -> list[RoundReuse]:
    """Per round of `rounds` (engine.rounds_for): full or cached, and the static sizes of its active set."""
    out, stale = [], 0
    for i, r in enumerate(rounds):
        full = (not reuse.cache or i < reuse.warmup
                or (reuse.refresh > 0 and (i - reuse.warmup) % reuse.refresh == reuse.refresh - 1))
        changed = rounds[i - 1].count if i else 0
        stale += changed
        active = r.n if full else min(r.n, max(r.count, math.ceil(reuse.active * r.count)))
        sweep = 0 if full else min(r.n - active, reuse.sweep)
        out.append(RoundReuse(full, changed, stale, active, sweep))
        if full:
            stale = 0
    return out


def first_true(flags: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) booleans with n True per row -> their positions (B, n), ascending, without a device-to-host copy."""
    return torch.sort(flags.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n]


class ReuseState:
    """The buffers one generation carries from round to round: per-layer K/V caches (B', H, S, d), the layer-0
    projections (B', S, 3, H, d), and p0 of every token (B, N, K)."""

    def __init__(self, reuse: Reuse, B: int, N: int, K: int, device):
        self.reuse = reuse
        self.k: list | None = None
        self.v: list | None = None
        self.qkv0: torch.Tensor | None = None
        self.p0 = torch.zeros(B, N, K, device=device, dtype=torch.float32)
        self.age = torch.zeros(B, N, device=device, dtype=torch.float32)   # the round each token's p0 comes from
        self.prev_mask: torch.Tensor | None = None    # the mask before the previous round
        self.qkv0_mask: torch.Tensor | None = None    # the mask qkv0 was computed for
        self.key_mask: torch.Tensor | None = None     # a text model's (B', L + N) key mask, from the full rounds


def conditions_full(model, codes, mask, cond_labels, kernels, state: ReuseState, rr: RoundReuse, branches: int):
    """Every row through the transformer -> z (B', N, D), as transformer.conditions with kernels.attention, keeping what
    later rounds reuse: layer-0 projections (recomputed only for the `rr.stale` tokens unmasked since they were
    last computed) and, with
    cache=True, every layer's rotated keys and values."""
    tr = model.transformer
    P = tr.cfg.cond_tokens
    x, ada, key_mask = tr.embed(codes.repeat(branches, 1, 1), mask.repeat(branches, 1), cond_labels)
    state.key_mask = key_mask
    cos, sin = tr.rope(x.device)
    reuse = state.reuse
    for li, layer in enumerate(tr.layers):
        if li == 0 and reuse.layer0:
            qkv = _layer0_projections(layer, x, ada, mask, state, rr, branches, P)
        else:
            qkv = layer.qkv(x, ada)
        if reuse.cache:
            _store_kv(state, li, qkv, cos, sin, len(tr.layers))
        attn = kernels.attention(qkv, cos, sin) if key_mask is None else kernels.attention(qkv, cos, sin, key_mask)
        x = layer.after_attention(x, attn, ada)
    return tr.norm(x)[:, P:] + tr.diffusion_pos_embed_learned


def _layer0_projections(layer, x, ada, mask, state: ReuseState, rr: RoundReuse, branches: int, P: int):
    if state.qkv0 is None:
        state.qkv0 = layer.qkv(x, ada)
    elif rr.stale:
        rows = first_true(state.qkv0_mask & ~mask, rr.stale).repeat(branches, 1) + P        # sequence positions (B', c)
        x_rows = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
        fresh = layer.qkv(x_rows, ada)                                                  # (B', c, 3, H, d)
        at = rows[:, :, None, None, None].expand(-1, -1, *fresh.shape[2:])
        state.qkv0.scatter_(1, at, fresh)
    state.qkv0_mask = mask.clone()   # the compiled unmask_topk updates mask in place
    return state.qkv0


def _store_kv(state: ReuseState, li: int, qkv, cos, sin, n_layer: int):
    k = apply_rope(qkv[:, :, 1], cos, sin).transpose(1, 2).contiguous()                # (B', H, S, d)
    v = qkv[:, :, 2].transpose(1, 2).contiguous()
    if state.k is None:
        state.k, state.v = [None] * n_layer, [None] * n_layer
    state.k[li], state.v[li] = k, v


def conditions_cached(model, codes, mask, cond_labels, kernels, state: ReuseState, rr: RoundReuse, branches: int):
    """A cached round's transformer: only the active rows (a class model's condition token, the `rr.changed` tokens
    unmasked last round, the `rr.active` most confident masked tokens by the last p0, the `rr.sweep` oldest others) ->
    (their z (B', active + sweep, D), their token positions (B, active + sweep)); the active rows' keys and values are
    refreshed in the caches on the way. A text model's text rows stay as the last full round cached them."""
    tr = model.transformer
    P = tr.cfg.cond_tokens
    text = tr.cfg.is_text
    B, N, _ = codes.shape
    conf = confidence(state.p0).masked_fill(~mask, float("-inf"))
    cand = torch.sort(conf, dim=1, descending=True, stable=True).indices[:, :rr.active]          # (B, active)
    if rr.sweep:   # the masked tokens whose p0 is oldest (not already chosen), lowest position first among equals
        age = state.age.masked_fill(~mask, float("inf")).scatter(1, cand, float("inf"))
        cand = torch.cat([cand, torch.sort(age, dim=1, stable=True).indices[:, :rr.sweep]], 1)
    parts = [] if text else [torch.zeros(B, 1, dtype=torch.long, device=codes.device)]
    if rr.changed:
        parts.append(first_true(state.prev_mask & ~mask, rr.changed) + P)
    parts.append(cand + P)
    rows = torch.cat(parts, 1).repeat(branches, 1)                                               # (B', A)
    if text:   # embed only the active image rows; the text rows' keys and values are in the caches already
        tok = rows[:B] - P                                                                       # (B, A) tokens
        x = tr.embed_tokens(torch.gather(codes, 1, tok[..., None].expand(-1, -1, codes.shape[-1])),
                            torch.gather(mask, 1, tok)).repeat(branches, 1, 1)
        ada, key_mask = None, state.key_mask
    else:
        x, ada, key_mask = tr.embed(codes.repeat(branches, 1, 1), mask.repeat(branches, 1), cond_labels)
        x = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
    cos, sin = tr.rope(x.device)
    for li, layer in enumerate(tr.layers):
        qkv = layer.qkv(x, ada)
        attn = (kernels.attention_cached(qkv, rows, state.k[li], state.v[li], cos, sin) if key_mask is None else
                kernels.attention_cached(qkv, rows, state.k[li], state.v[li], cos, sin, key_mask))
        x = layer.after_attention(x, attn, ada)
    first = (0 if text else 1) + rr.changed
    pos = tr.diffusion_pos_embed_learned[0][cand.repeat(branches, 1)]                            # (B', active, D)
    return tr.norm(x[:, first:]) + pos, cand
