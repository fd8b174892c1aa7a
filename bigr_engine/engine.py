"""The fast generation path: the reference sampler's algorithm with the work it does not need removed.

Same samples as `sampler.generate` (every draw is keyed by seed, sample index, token and bit through
`rng`), but:
- only still-masked tokens go through the transcoder (the release runs all N every iteration);
- the transcoder's condition projection c_embedder(z) is computed once per iteration, not per step,
  and the time-step embeddings once per call;
- the conditional and unconditional branches run as one batch;
- the unmask counts are known ahead (every row has the same), so shapes are static and nothing waits
  on the device inside the loop.
"""
from __future__ import annotations

import torch

from . import rng
from .sampler import SamplingOptions, cfg_at, gumbel_at, masked_after, prepare_batch
from .transcoder import flip_to_p0, inference_steps, posterior_one


def _draw_at(p, opts: SamplingOptions, sample_index, stream_id, counters):
    if opts.greedy:
        return (p > 0.5).to(p.dtype)
    return (rng.uniform_at(opts.seed, sample_index, stream_id, counters) < p.float()).to(p.dtype)


def transcode_masked(transcoder, cz: torch.Tensor, temb: torch.Tensor, steps: list, cfg: float, use_cfg: bool,
                     opts: SamplingOptions, tables: dict, sample_index, iteration: int, counters) -> torch.Tensor:
    """p0 (B,n,K) for the n masked tokens per row. cz: c_embedder(z) for [cond; uncond] rows, (2*B*n or B*n, Hd);
    temb (S, Hd) per step; counters (B,n,K) are the rng counters (token * K + bit) of those tokens' bits."""
    B, n, K = counters.shape
    x = _draw_at(torch.full((B, n, K), 0.5, device=cz.device), opts, sample_index,
                 rng.stream(rng.TRANSCODER_INIT, iteration), counters)
    branches = 2 if use_cfg else 1
    for j, t in enumerate(steps):
        c = cz + temb[j]
        xf = x.reshape(B * n, K)
        logits = transcoder.forward_with_condition(xf.repeat(branches, 1), c).float() / opts.temperature
        if use_cfg:
            l_c, l_u = logits.chunk(2)
            logits = l_u + cfg * (l_c - l_u)
        p0 = flip_to_p0(logits, xf).view(B, n, K)
        if j == len(steps) - 1:
            return p0
        post = posterior_one(p0, x, t, steps[j + 1], tables)
        x = _draw_at(post, opts, sample_index, rng.stream(rng.TRANSCODER_STEP, iteration, j), counters)


@torch.no_grad()
def generate(model, labels: torch.Tensor, opts: SamplingOptions, sample_index: torch.Tensor | None = None,
             progress: bool = False) -> torch.Tensor:
    """Drop-in for `sampler.generate` (full generation from all-masked): -> codes (B,N,K) uint8."""
    cfg_model = model.cfg
    B, N, K = labels.shape[0], cfg_model.num_tokens, cfg_model.bits
    dev = model.device
    labels, sample_index, null = prepare_batch(model, labels, sample_index)
    use_cfg = opts.cfg != 1.0
    cond_labels = torch.cat([labels, null]) if use_cfg else labels
    tables = model.schedule(dev)
    steps = inference_steps(cfg_model.train_steps, opts.steps)
    tr = model.transcoder
    temb = tr.t_embedder(torch.tensor(steps, device=dev) - 1)          # (S, Hd)
    bit = torch.arange(K, device=dev)

    codes = torch.zeros(B, N, K, device=dev, dtype=tr.x_embedder.weight.dtype)
    mask = torch.ones(B, N, dtype=torch.bool, device=dev)
    rounds = range(opts.iters)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="generate", unit="iter", leave=False)
    n = N
    for s in rounds:
        ratio = (s + 1) / opts.iters
        keep = masked_after(s, opts.iters, N)
        codes, mask = _iteration(model, codes, mask, cond_labels, use_cfg, cfg_at(opts, ratio), gumbel_at(opts, ratio),
                                 n, n - keep, opts, tables, steps, temb, bit, sample_index, s)
        n = keep
    if n:  # one more pass fills whatever is left (the cosine schedule normally ends at 0)
        codes, mask = _iteration(model, codes, mask, cond_labels, use_cfg, opts.cfg, 0.0, n, n, opts, tables, steps,
                                 temb, bit, sample_index, opts.iters)
    return codes.to(torch.uint8)


def _iteration(model, codes, mask, cond_labels, use_cfg, cfg, gumbel_temp, n, count, opts, tables, steps, temb, bit,
               sample_index, s):
    B, N, K = codes.shape
    branches = 2 if use_cfg else 1
    z = model.transformer.conditions(codes.repeat(branches, 1, 1), mask.repeat(branches, 1), cond_labels)
    # masked positions in ascending order (a stable sort of the mask needs no device-to-host copy)
    idx = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n]     # (B, n)
    z_m = torch.gather(z, 1, idx.repeat(branches, 1)[..., None].expand(-1, -1, z.shape[-1]))        # (branches*B, n, D)
    cz = model.transcoder.c_embedder(z_m.reshape(branches * B * n, -1))
    counters = idx[..., None] * K + bit                                                            # (B, n, K)
    p0 = transcode_masked(model.transcoder, cz, temb, steps, cfg, use_cfg, opts, tables, sample_index, s, counters)
    conf = (2 * (p0 - 0.5).abs()).mean(-1)                                                         # (B, n)
    if gumbel_temp > 0:
        conf = conf + gumbel_temp * rng.to_gumbel(rng.uniform_at(opts.seed, sample_index, rng.stream(rng.GUMBEL, s), idx))
    # the `count` most confident of the masked tokens; ties go to the lowest position (idx is ascending)
    top = torch.sort(conf, dim=1, descending=True, stable=True).indices[:, :count]                 # (B, count)
    pos = torch.gather(idx, 1, top)
    p_sel = torch.gather(p0, 1, top[..., None].expand(-1, -1, K))
    if opts.deterministic:
        bits = (p_sel > 0.5).to(codes.dtype)
    else:
        bits = _draw_at(p_sel, opts, sample_index, rng.stream(rng.TOKEN_BITS, s), pos[..., None] * K + bit).to(codes.dtype)
    codes = codes.scatter(1, pos[..., None].expand(-1, -1, K), bits)
    mask = mask.scatter(1, pos, False)
    return codes, mask
