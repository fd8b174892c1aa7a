"""The fast generation path: the reference sampler's algorithm with the work it does not need removed.

Same samples as `sampler.generate` (every draw is keyed by seed, sample index, token and bit through
`rng`), but:
- only still-masked tokens go through the transcoder (the release runs all N every iteration);
- the transcoder's condition projection c_embedder(z) is computed once per iteration, not per step,
  and the time-step embeddings once per call;
- the conditional and unconditional branches run as one batch; cfg = 1 runs only the conditional one;
- the unmask counts are known ahead (every row has the same), so shapes are static and nothing waits
  on the device inside the loop: a whole call can be captured as one CUDA graph (per batch-size bucket);
- with the extension built, the compiled ops do the step arithmetic (posterior_step), the unmasking
  (unmask_topk) and the attention (rope_attention); they compute the same numbers as the plain-PyTorch
  path here and in `sampling.reference` (same sigmoid, same summation order), except attention, which rounds differently;
- on CUDA the matmuls run in bfloat16 under autocast by default (probabilities stay float32).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bigr_engine.errors import BigrError
from bigr_engine.models.transcoder import flip_to_p0, inference_steps, posterior_one
from bigr_engine.ops import compiled, kernels as kernel_choice, rng
from bigr_engine.ops.kernels import Kernels
from bigr_engine.sampling import graphs, reuse as state_reuse
from bigr_engine.sampling.options import Round, SamplingOptions, rounds_for
from bigr_engine.sampling.reference import confidence, prepare_batch

LOOP_KERNELS = ("posterior_step", "unmask_topk")   # what ops=True insists on


def choose_kernels(model, dtype: torch.dtype, ops: bool | None = None) -> Kernels:
    """The kernels a generation on the model's device in `dtype` uses: ops=None as available, False none, True the
    loop kernels or an error saying why they cannot run."""
    k = kernel_choice.choose(model.device, dtype, model.cfg.head_dim, enabled=ops is not False)
    if ops:
        missing = k.refused(LOOP_KERNELS)
        if missing:
            raise BigrError(f"ops=True but the compiled {', '.join(missing)} cannot run; pass ops=None to fall back "
                            f"to the plain path")
    return k


def _draw_at(p, opts: SamplingOptions, sample_index, stream_id, counters):
    if opts.greedy:
        return (p > 0.5).to(p.dtype)
    return (rng.uniform_at(opts.seed, sample_index, stream_id, counters) < p.float()).to(p.dtype)


def _initial_bits(opts: SamplingOptions, sample_index, stream_id, counters, kernels: Kernels | None) -> torch.Tensor:
    """x_T ~ Bernoulli(0.5) per (token, bit) as uint8 (all zeros when greedy: the mode of p = 0.5 is 0), through the
    compiled rng where chosen."""
    if opts.greedy:
        return torch.zeros(counters.shape, dtype=torch.uint8, device=counters.device)
    uniform = rng.uniform_at if kernels is None else kernels.uniform_at
    return (uniform(opts.seed, sample_index, stream_id, counters) < 0.5).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- transcoder loop

def transcode_masked(transcoder, cz: torch.Tensor, temb: torch.Tensor, steps: list, cfg: float, use_cfg: bool,
                     opts: SamplingOptions, tables: dict, sample_index, iteration: int, counters,
                     kernels: Kernels | None = None) -> torch.Tensor:
    """Plain PyTorch: p0 (B,n,K) float32 for the n masked tokens per row. cz: c_embedder(z) for [cond; uncond] rows,
    (2*B*n or B*n, Hd); temb (S, Hd) per step; counters (B,n,K) are the rng counters (token * K + bit) of those bits."""
    B, n, K = counters.shape
    x = _initial_bits(opts, sample_index, rng.stream(rng.TRANSCODER_INIT, iteration), counters, kernels).float()
    branches = 2 if use_cfg else 1
    for j, t in enumerate(steps):
        c = cz + temb[j]
        xf = x.reshape(B * n, K)
        logits = transcoder.forward_with_condition(xf.repeat(branches, 1), c, kernels).float() / opts.temperature
        if use_cfg:
            l_c, l_u = logits.chunk(2)
            logits = l_u + cfg * (l_c - l_u)
        p0 = flip_to_p0(logits, xf).view(B, n, K)
        if j == len(steps) - 1:
            return p0
        post = posterior_one(p0, x, t, steps[j + 1], tables)
        x = _draw_at(post, opts, sample_index, rng.stream(rng.TRANSCODER_STEP, iteration, j), counters)


def transcode_masked_ops(transcoder, cz, temb, steps, cfg, use_cfg, opts, tables, sample_index, iteration,
                         token_index: torch.Tensor, K: int, kernels: Kernels) -> torch.Tensor:
    """transcode_masked with the fused posterior_step: x ping-pongs between two uint8 buffers, p0 lands in a third.
    token_index (B, n) are the tokens' positions (they key the draws)."""
    B, n = token_index.shape
    counters = token_index[..., None] * K + torch.arange(K, device=cz.device)
    x = _initial_bits(opts, sample_index, rng.stream(rng.TRANSCODER_INIT, iteration), counters, kernels)
    x_next = torch.empty_like(x)
    p0 = torch.empty(B, n, K, device=cz.device, dtype=torch.float32)
    branches = 2 if use_cfg else 1
    for j, t in enumerate(steps):
        logits = transcoder.forward_with_condition(x.view(B * n, K).repeat(branches, 1), cz + temb[j], kernels)
        l_c, l_u = logits.chunk(2) if use_cfg else (logits, None)
        last = j == len(steps) - 1
        compiled.posterior_step(l_c, l_u, x, p0 if last else x_next, cfg, opts.temperature, t,
                                0 if last else steps[j + 1], tables["k_final"], tables["b_final"], tables["beta"],
                                opts.seed, sample_index, rng.stream(rng.TRANSCODER_STEP, iteration, j), token_index,
                                opts.greedy)
        x, x_next = x_next, x
    return p0


# ---------------------------------------------------------------------------------------------- generation

@dataclass
class _Plan:
    """What a call needs that depends only on the model, device and options: made before the loop (and before a
    CUDA graph capture, which must not copy from the host)."""
    rounds: list
    steps: list
    temb: torch.Tensor
    tables: dict
    kernels: Kernels
    dtype: torch.dtype
    reuse: state_reuse.Reuse
    reuse_rounds: list      # a RoundReuse per round (full or cached, active-set sizes); empty when reuse is "off"


def _make_plan(model, opts: SamplingOptions, kernels: Kernels, dtype: torch.dtype, reuse: state_reuse.Reuse) -> _Plan:
    dev = model.device
    steps = inference_steps(model.cfg.train_steps, opts.steps)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        temb = model.transcoder.t_embedder(torch.tensor(steps, device=dev) - 1)          # (S, Hd)
    rounds = rounds_for(opts, model.cfg.num_tokens)
    off = not (reuse.layer0 or reuse.cache)
    return _Plan(rounds, steps, temb, model.schedule(dev), kernels, dtype, reuse,
                 [] if off else state_reuse.plan_reuse(reuse, rounds))


def _run(model, plan: _Plan, labels, null, sample_index, opts: SamplingOptions, progress: bool) -> torch.Tensor:
    cfg_model = model.cfg
    B, N, K = labels.shape[0], cfg_model.num_tokens, cfg_model.bits
    dev = model.device
    use_cfg = opts.cfg != 1.0
    cond_labels = torch.cat([labels, null]) if use_cfg else labels
    codes = torch.zeros(B, N, K, device=dev, dtype=torch.uint8)
    mask = torch.ones(B, N, dtype=torch.bool, device=dev)
    rounds = plan.rounds
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="generate", unit="iter", leave=False)
    with torch.autocast(dev.type, dtype=plan.dtype, enabled=plan.dtype != torch.float32):
        return _rounds(model, plan, rounds, codes, mask, cond_labels, sample_index, opts, use_cfg)


def _rounds(model, plan, rounds, codes, mask, cond_labels, sample_index, opts, use_cfg):
    B, _, K = codes.shape
    dev = codes.device
    kernels = plan.kernels
    bit = torch.arange(K, device=dev)
    branches = 2 if use_cfg else 1
    state = state_reuse.ReuseState(plan.reuse, B, codes.shape[1], K, dev) if plan.reuse_rounds else None
    for i, r in enumerate(rounds):
        idx = state_reuse.first_true(mask, r.n)   # masked positions, ascending (B, n)
        tok = idx           # the tokens that go through the transcoder this round
        if state is None:
            z = model.transformer.conditions(codes.repeat(branches, 1, 1), mask.repeat(branches, 1), cond_labels,
                                             attn_fn=kernels.attention)
        elif plan.reuse_rounds[i].full:
            z = state_reuse.conditions_full(model, codes, mask, cond_labels, kernels, state, plan.reuse_rounds[i],
                                            branches)
        else:
            z, tok = state_reuse.conditions_cached(model, codes, mask, cond_labels, kernels, state,
                                                   plan.reuse_rounds[i], branches)
        if tok is idx:
            z = torch.gather(z, 1, idx.repeat(branches, 1)[..., None].expand(-1, -1, z.shape[-1]))
        cz = model.transcoder.c_embedder(z.reshape(branches * B * tok.shape[1], -1))
        if kernels.uses("posterior_step"):
            p0 = transcode_masked_ops(model.transcoder, cz, plan.temb, plan.steps, r.cfg, use_cfg, opts,
                                      plan.tables, sample_index, r.iteration, tok, K, kernels)
        else:
            p0 = transcode_masked(model.transcoder, cz, plan.temb, plan.steps, r.cfg, use_cfg, opts, plan.tables,
                                  sample_index, r.iteration, tok[..., None] * K + bit, kernels)
        if state is not None:
            if plan.reuse.cache:   # the p0 of every masked token: fresh for those just computed, kept for the rest
                state.p0.scatter_(1, tok[..., None].expand(-1, -1, K), p0)
                state.age.scatter_(1, tok, float(i))
                if tok is not idx:
                    p0 = torch.gather(state.p0, 1, idx[..., None].expand(-1, -1, K))
            state.prev_mask = mask.clone()
        if kernels.uses("unmask_topk"):
            k = torch.full((B,), r.count, device=dev, dtype=torch.int64)
            compiled.unmask_topk(p0, idx, k, codes, mask, r.gumbel, opts.seed, sample_index,
                                 rng.stream(rng.GUMBEL, r.iteration), rng.stream(rng.TOKEN_BITS, r.iteration),
                                 opts.deterministic or opts.greedy)
        else:
            codes, mask = _unmask(p0, idx, r, codes, mask, opts, sample_index, bit)
    return codes


def _unmask(p0, idx, r: Round, codes, mask, opts, sample_index, bit):
    """unmask_topk in plain PyTorch: the r.count most confident (+ Gumbel) of the candidates idx, ties to the lowest
    position (idx is ascending); their bits go into the codes."""
    K = p0.shape[-1]
    conf = confidence(p0)                                                                          # (B, n)
    if r.gumbel > 0:
        g = rng.to_gumbel(rng.uniform_at(opts.seed, sample_index, rng.stream(rng.GUMBEL, r.iteration), idx))
        conf = conf + r.gumbel * g
    top = torch.sort(conf, dim=1, descending=True, stable=True).indices[:, :r.count]               # (B, count)
    pos = torch.gather(idx, 1, top)
    p_sel = torch.gather(p0, 1, top[..., None].expand(-1, -1, K))
    if opts.deterministic:
        bits = (p_sel > 0.5).to(codes.dtype)
    else:
        bits = _draw_at(p_sel, opts, sample_index, rng.stream(rng.TOKEN_BITS, r.iteration), pos[..., None] * K + bit)
    codes = codes.scatter(1, pos[..., None].expand(-1, -1, K), bits.to(codes.dtype))
    mask = mask.scatter(1, pos, False)
    return codes, mask


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None or "auto" -> bfloat16 on CUDA, float32 elsewhere; a name from DTYPES or one of its torch dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dt = DTYPES.get(dtype, dtype)
    if dt not in DTYPES.values():
        raise BigrError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dt


@torch.no_grad()
def generate(model, labels: torch.Tensor, opts: SamplingOptions, sample_index: torch.Tensor | None = None,
             progress: bool = False, ops: bool | None = None, dtype=None, cuda_graph: bool | None = None,
             kernels: Kernels | None = None, reuse=None, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for `reference.generate` (full generation from all-masked, entropy order): -> codes (B,N,K) uint8.

    ops: use the compiled kernels (default: those that run and passed their self-test on the model's device), or
    pass `kernels` (an ops.kernels.Kernels) chosen by the caller. dtype: the matmul precision under autocast (default
    bfloat16 on CUDA, float32 elsewhere). cuda_graph: capture the call as a CUDA graph per batch bucket (default on
    CUDA unless a progress bar is asked for). reuse: state reuse across iterations (sampling.reuse): "exact" (the
    default; same codes), "off", "fast" (approximate: changes samples) or a dict of parameters. Reads the model,
    never changes it: concurrent calls are safe. seeds: (B,) per-row seeds in place of opts.seed (a service merging
    requests of different seeds): row b gets what a call with seed=seeds[b] gives it. The compiled sampling ops take
    a CUDA graph takes them (and an int seed) as an input, so new seeds replay the same capture."""
    if opts.order != "entropy":
        raise BigrError(f"the engine samples in entropy order only; use backend='reference' for order={opts.order!r}")
    dev = model.device
    dt = resolve_dtype(dtype, dev)
    if cuda_graph is None:
        cuda_graph = dev.type == "cuda" and not progress
    elif cuda_graph and dev.type != "cuda":
        raise BigrError("cuda_graph=True needs the model on a CUDA device")
    if kernels is None:
        kernels = choose_kernels(model, dt, ops)
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
        if seeds.shape[0] != labels.shape[0]:
            raise BigrError(f"seeds needs one entry per label: {seeds.shape[0]} for {labels.shape[0]} labels")
        if bool((seeds < 0).any()):
            raise BigrError(f"seeds must be in 0..2^63-1, got {int(seeds.min())}")
        if bool((seeds == seeds[0]).all()):
            opts, seeds = dataclasses.replace(opts, seed=int(seeds[0])), None
        else:   # every draw (ops.rng, the compiled ops) takes per-row seeds; opts.seed holds the (B,) tensor from here
            if not cuda_graph:
                opts = dataclasses.replace(opts, seed=seeds.to(model.device))
    reuse = state_reuse.resolve_reuse(reuse)
    plan = _make_plan(model, opts, kernels, dt, reuse)
    labels, sample_index, null = prepare_batch(model, labels, sample_index)
    if cuda_graph:   # the seeds are a static input of the graph (per row), so a new seed replays the same capture
        if seeds is None:
            seeds = torch.full((labels.shape[0],), opts.seed, dtype=torch.int64)
        return graphs.replay(model, plan, labels, null, sample_index, seeds.to(dev), opts,
                             lambda lab, nul, si, sd: _run(model, plan, lab, nul, si,
                                                           dataclasses.replace(opts, seed=sd), False))
    return _run(model, plan, labels, null, sample_index, opts, progress)
