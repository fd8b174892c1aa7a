"""The reference sampler: the release's entropy-ordered generation (spec sections 3-4), plain PyTorch.

Readable on purpose: every faster backend is tested against it. It runs the transcoder on all N
tokens every iteration as the release does, with the conditional and unconditional branches in one call (they share
x_t). Random draws come from `rng` (keyed by seed and sample index), so a sample does not depend on its batch; the
compiled `rng_uniform` computes them where it runs (the same numbers: the Python hash of every bit at every step
would otherwise make this baseline slower than the release's own sampler).
"""
from __future__ import annotations

import math

import torch

from bigr_engine.models.transcoder import flip_to_p0, inference_steps, posterior_one
from bigr_engine.ops import kernels, rng
from bigr_engine.ops.reference import confidence_ref
from bigr_engine.sampling.options import ORDERS, SamplingOptions, cfg_at, gumbel_at, masked_after

def uniform(seed: int, sample_index, stream_id: int, shape: tuple) -> torch.Tensor:
    """rng.uniform (counter = flat position within `shape`), through the compiled rng where it runs."""
    n = math.prod(shape)
    counters = torch.arange(n, device=sample_index.device).expand(sample_index.shape[0], n)
    u = kernels.choose(sample_index.device).uniform_at(seed, sample_index, stream_id, counters)
    return u.view(sample_index.shape[0], *shape)


def draw(p: torch.Tensor, opts: SamplingOptions, sample_index, stream_id: int) -> torch.Tensor:
    """Bernoulli(p) per element (u < p, as rng.bernoulli), or its mode p > 0.5 when greedy."""
    if opts.greedy:
        return (p > 0.5).to(p.dtype)
    return (uniform(opts.seed, sample_index, stream_id, tuple(p.shape[1:])) < p.float()).to(p.dtype)


def transcode(transcoder, z_c, z_u, cfg: float, opts: SamplingOptions, tables: dict, T: int,
              sample_index, iteration: int) -> torch.Tensor:
    """Run the Bernoulli denoiser from x_T to p0 for every token. z_c/z_u (B,N,D); z_u None means no CFG.
    Returns p0 = P(x_0 = 1), (B,N,K) float32."""
    B, N, _ = z_c.shape
    K = transcoder.final_layer.linear.out_features
    x = draw(torch.full((B, N, K), 0.5, device=z_c.device), opts, sample_index, rng.stream(rng.TRANSCODER_INIT, iteration))
    steps = inference_steps(T, opts.steps)
    branches = 1 if z_u is None else 2
    z = z_c if z_u is None else torch.cat([z_c, z_u])
    z = z.reshape(branches * B * N, -1)
    for j, t in enumerate(steps):
        step = torch.full((branches * B * N,), t, dtype=torch.long, device=z_c.device)
        xf = x.reshape(B * N, K)
        logits = transcoder(xf.repeat(branches, 1), step, z).float() / opts.temperature
        if z_u is not None:
            l_c, l_u = logits.chunk(2)
            logits = l_u + cfg * (l_c - l_u)
        p0 = flip_to_p0(logits, xf).view(B, N, K)
        if j == len(steps) - 1:
            return p0
        post = posterior_one(p0, x, t, steps[j + 1], tables)
        x = draw(post, opts, sample_index, rng.stream(rng.TRANSCODER_STEP, iteration, j))


def confidence(p0: torch.Tensor) -> torch.Tensor:
    """The release's stand-in for 1 - binary entropy: mean over bits of 2|p0 - 0.5|, summed in bit order (so the
    compiled unmask_topk ranks tokens identically)."""
    return confidence_ref(p0)


def order_scores(p0: torch.Tensor, opts: SamplingOptions, gumbel_temp: float, sample_index, s: int) -> torch.Tensor:
    """Per-token priority (B,N): the `count` highest of the still-masked tokens are unmasked at iteration s.
    entropy: confidence plus (scheduled) Gumbel noise; random: a uniform keyed by (seed, sample, s, token), so the
    order does not depend on the model's output; raster: minus the position, so the lowest positions go first."""
    if opts.order == "random":
        return uniform(opts.seed, sample_index, rng.stream(rng.RANDOM_ORDER, s), (p0.shape[1],))
    if opts.order == "raster":
        return -torch.arange(p0.shape[1], device=p0.device, dtype=torch.float32).expand(p0.shape[0], -1)
    if opts.order != "entropy":
        raise ValueError(f"order must be one of {ORDERS}, got {opts.order!r}")
    conf = confidence(p0)
    if gumbel_temp > 0:
        conf = conf + gumbel_temp * rng.to_gumbel(uniform(opts.seed, sample_index, rng.stream(rng.GUMBEL, s), (conf.shape[1],)))
    return conf


def select_tokens(conf: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Boolean (B,N): per row b the count[b] highest-confidence still-masked tokens, ties to the lowest index."""
    conf = conf.masked_fill(~mask, float("-inf"))
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < count[:, None]) & mask


def prepare_batch(model, labels: torch.Tensor, sample_index: torch.Tensor | None):
    """-> labels and sample indices on the model's device, and the matching null-class labels (ids or weights)."""
    dev = model.device
    labels = labels.to(dev)
    if sample_index is None:
        sample_index = torch.arange(labels.shape[0], device=dev)
    if model.cfg.is_text:   # the empty prompt's condition (models.text.pack_condition), saved with the model
        return labels, sample_index.to(dev), model.transformer.null_text.to(labels.dtype).expand(labels.shape[0], -1, -1)
    null = torch.full((labels.shape[0],), model.cfg.null_class, dtype=torch.long, device=dev)
    if labels.is_floating_point():
        null = torch.nn.functional.one_hot(null, model.cfg.num_classes + 1).to(labels.dtype)
    return labels, sample_index.to(dev), null


@torch.no_grad()
def generate(model, labels: torch.Tensor, opts: SamplingOptions, sample_index: torch.Tensor | None = None,
             progress: bool = False, codes: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             schedule: str = "cosine") -> torch.Tensor:
    """Generation (entropy-ordered unless opts.order says otherwise); labels (B,) ids or (B, C+1) class weights -> codes (B,N,K) uint8.

    By default every token starts masked. Given `codes` and `mask` (True = to generate), the known tokens stay
    as they are and only the masked ones are filled (in/outpainting), on the given schedule over their count."""
    cfg_model = model.cfg
    B, N, K = labels.shape[0], cfg_model.num_tokens, cfg_model.bits
    dev = model.device
    labels, sample_index, null = prepare_batch(model, labels, sample_index)
    use_cfg = opts.cfg != 1.0
    tables = model.schedule(dev)

    codes = torch.zeros(B, N, K, device=dev) if codes is None else codes.to(dev, torch.float32).clone()
    mask = torch.ones(B, N, dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool().clone()
    to_fill = mask.sum(1).tolist()
    rounds = list(range(opts.iters))
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="generate", unit="iter", leave=False)
    for s in rounds:
        ratio = (s + 1) / opts.iters
        keep = torch.tensor([masked_after(s, opts.iters, n, schedule) for n in to_fill], device=dev)
        count = mask.sum(1) - keep
        codes, mask = _iteration(model, codes, mask, labels, null, use_cfg, cfg_at(opts, ratio), gumbel_at(opts, ratio),
                                 count, opts, tables, sample_index, s)
    if bool(mask.any()):  # one more pass fills whatever is left
        codes, mask = _iteration(model, codes, mask, labels, null, use_cfg, opts.cfg, 0.0, mask.sum(1), opts, tables,
                                 sample_index, opts.iters)
    return codes.to(torch.uint8)


def _iteration(model, codes, mask, labels, null, use_cfg, cfg, gumbel_temp, count, opts, tables, sample_index, s):
    B = codes.shape[0]
    if use_cfg:
        z = model.transformer.conditions(torch.cat([codes, codes]), torch.cat([mask, mask]), torch.cat([labels, null]))
        z_c, z_u = z[:B], z[B:]
    else:
        z_c, z_u = model.transformer.conditions(codes, mask, labels), None
    p0 = transcode(model.transcoder, z_c, z_u, cfg, opts, tables, model.cfg.train_steps, sample_index, s)
    chosen = select_tokens(order_scores(p0, opts, gumbel_temp, sample_index, s), mask, count)
    bits = (p0 > 0.5).float() if opts.deterministic else draw(p0, opts, sample_index, rng.stream(rng.TOKEN_BITS, s))
    codes = torch.where(chosen[..., None], bits, codes)
    return codes, mask & ~chosen
