"""Zero-shot applications of a trained BiGR model (spec section 5): in/outpainting, class-guided
editing, class interpolation and enrichment.

Every function takes the BiGR model and its B-AE tokenizer. Images are float tensors (B, 3, S, S) in
[0, 1] at the tokenizer's size S; pixel masks are (B, 1, S, S), (B, S, S) or (S, S) (shared by every
image), bool or float, where True / 1 (white) means "regenerate".

How the pieces fit:

- The pixel mask becomes a token mask by nearest-neighbour resizing to the G x G token grid
  (``F.interpolate(mode="nearest")``), so a token is regenerated when the pixel its cell samples is.
- Known tokens are the image's B-AE code with Bernoulli-sampled bits, drawn from the counter-based
  RNG (``rng.ENCODE`` stream), and are kept exactly; only the masked tokens are generated, on the
  linear schedule over their count (the spec's choice for in/outpainting).
- Randomness is keyed by ``seed`` and a sample index: with ``variations=v``, result j of input i is
  sample ``i*v + j`` (its encoding draws and its generation draws both), so a result does not depend
  on the rest of the batch.
- Without labels the null class is used (the spec's default for in/outpainting). CFG mixes the
  conditional branch with the null one, so with the null class it has no effect and is skipped.
- A mask that selects every token keeps nothing of the image: it runs as plain generation (cosine
  schedule, as ``BiGR.generate``) and says so with a ``UserWarning``. A mask that selects no token
  raises ``BigrError``.

The ``*_codes`` variants return codes (B', N, K) uint8 and leave decoding to the caller.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from bigr_engine.ops import rng
from bigr_engine.sampling import reference as sampler
from bigr_engine.sampling.options import SamplingOptions
from bigr_engine.errors import BigrError

__all__ = [
    "encode_images", "decode_codes", "upsample_to_tokenizer", "token_mask", "inpaint", "inpaint_codes", "outpaint",
    "outpaint_codes", "edit", "edit_codes", "interpolate", "interpolate_codes", "enrich", "enrich_codes", "enrich_groups",
]

# ---- shared helpers ------------------------------------------------------------------------------

def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_pair(model, bae):
    if model.cfg.bits != bae.bits or model.cfg.num_tokens != bae.cfg.num_tokens:
        from bigr_engine.io.checkpoints import check_pair
        check_pair(model, bae)


def _check_images(bae, images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise BigrError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise BigrError(f"images must be float in [0, 1], got {images.dtype}; divide 8-bit images by 255")
    if images.dim() == 3:
        images = images[None]
    bae._check_images(images)
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise BigrError(f"image values must lie in [0, 1], got [{float(images.min()):.3g}, {float(images.max()):.3g}]; "
                        f"divide 8-bit images by 255")
    return images.clamp(0, 1)


def _sample_index(batch: int, variations: int, device) -> torch.Tensor:
    """Result j of input i is sample i*variations + j."""
    return torch.arange(batch * variations, device=device)


def _check_variations(variations: int):
    if int(variations) != variations or variations < 1:
        raise BigrError(f"variations must be a positive integer, got {variations}")


def _labels(model, labels, batch: int, variations: int) -> tuple[torch.Tensor, bool]:
    """-> (labels for the batch * variations rows, whether they are all the null class)."""
    if labels is None:
        return torch.full((batch * variations,), model.cfg.null_class, dtype=torch.long, device=model.device), True
    if isinstance(labels, str) or (isinstance(labels, (list, tuple)) and any(isinstance(x, str) for x in labels)):
        labels = model.check_labels(labels)   # class names, as generate takes them
    t = torch.as_tensor(labels, device=model.device)
    if t.is_floating_point():
        t = t if t.dim() == 2 else t[None]
        t = model.check_labels(t)
    else:
        t = model.check_labels(t.reshape(-1))
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    if t.shape[0] != batch:
        raise BigrError(f"pass one label per image (or a single label for all): got {t.shape[0]} labels for {batch} images")
    t = t.repeat_interleave(variations, dim=0)
    null = (not t.is_floating_point()) and bool((t == model.cfg.null_class).all())
    return t, null


@torch.no_grad()
def encode_images(bae, images: torch.Tensor, *, seed: int = 0, sample_index: torch.Tensor | None = None,
                  bernoulli: bool = True) -> torch.Tensor:
    """Images (B,3,S,S) in [0,1] -> codes (B,N,K) uint8 on the tokenizer's device.

    With ``bernoulli`` (the spec's choice for the applications) bit k of token n of image b is a
    Bernoulli draw keyed by (seed, sample_index[b]) on the ``rng.ENCODE`` stream; otherwise p > 0.5."""
    images = _check_images(bae, images)
    return _encode(bae, images, 1, seed, sample_index, bernoulli)


def _encode(bae, images: torch.Tensor, repeats: int, seed: int, sample_index, bernoulli: bool = True) -> torch.Tensor:
    """Run the encoder once per image, then draw the bits of each of its `repeats` copies (row i*repeats + j)."""
    dev = _device(bae)
    p = bae.encode_probs(images.to(dev)).float().repeat_interleave(repeats, dim=0)
    if not bernoulli:
        return (p > 0.5).to(torch.uint8)
    if sample_index is None:
        sample_index = torch.arange(p.shape[0], device=dev)
    sample_index = torch.as_tensor(sample_index, device=dev).long().reshape(-1)
    if sample_index.shape[0] != p.shape[0]:
        raise BigrError(f"sample_index needs one entry per image ({p.shape[0]}), got {sample_index.shape[0]}")
    return rng.bernoulli(p, seed, sample_index, rng.stream(rng.ENCODE, rng.ENCODE_BITS)).to(torch.uint8)


def token_mask(masks, grid: int, image_size: int | tuple[int, int] | None = None, batch: int | None = None) -> torch.Tensor:
    """Pixel masks (B,1,H,W), (B,H,W) or (H,W), bool or float (True / >= 0.5 = regenerate) -> (B, grid*grid)
    bool token mask in raster order, by nearest-neighbour resizing to (grid, grid).

    ``image_size`` (H, W) checks that the masks match the images; ``batch`` broadcasts a single mask."""
    m = torch.as_tensor(masks)
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1:
        raise BigrError(f"masks must be (B, 1, H, W), (B, H, W) or (H, W), got shape {tuple(torch.as_tensor(masks).shape)}")
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(m.shape[-2:]) != hw:
            raise BigrError(f"mask size {m.shape[-1]}x{m.shape[-2]} differs from the image size {hw[1]}x{hw[0]}; "
                            f"pass masks of the images' size (white = regenerate)")
    if batch is not None and m.shape[0] != batch:
        if m.shape[0] != 1:
            raise BigrError(f"got {m.shape[0]} masks for {batch} images; pass one mask per image or a single mask for all")
        m = m.expand(batch, -1, -1, -1)
    m = (m >= 0.5) if m.is_floating_point() else m.bool()
    small = F.interpolate(m.float(), size=(grid, grid), mode="nearest")
    return small.flatten(1) > 0.5


def _generate(model, labels: torch.Tensor, opts: SamplingOptions, sample_index: torch.Tensor,
              progress: bool = False, reuse=None) -> torch.Tensor:
    """Plain generation from all-masked, through BiGR.generate_with (its fastest backend; `reuse` as there)."""
    return model.generate_with(labels, opts, sample_index=sample_index, progress=progress, reuse=reuse)


def _fill(model, codes: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, opts: SamplingOptions,
          sample_index: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Generate the masked tokens of `codes`; rows whose mask covers every token run as plain generation."""
    full = mask.all(1)
    if not bool(full.any()):
        return sampler.generate(model, labels, opts, sample_index, progress, codes=codes, mask=mask, schedule="linear")
    warnings.warn("the mask selects every token, so nothing of the image is kept: running plain generation "
                  "(cosine schedule) for those images", UserWarning, stacklevel=3)
    out = codes.to(model.device, torch.uint8).clone()
    rows = full.nonzero().flatten()
    out[rows] = _generate(model, labels[rows], opts, sample_index[rows], progress)
    rest = (~full).nonzero().flatten()
    if rest.numel():
        out[rest] = sampler.generate(model, labels[rest], opts, sample_index[rest], progress,
                                     codes=codes[rest], mask=mask[rest], schedule="linear")
    return out


# ---- in/outpainting and editing ----------------------------------------------------------------

@torch.no_grad()
def inpaint_codes(model, bae, images: torch.Tensor, masks, labels=None, *, variations: int = 1, seed: int = 0,
                  iters: int | None = None, steps: int | None = None, cfg: float | None = None, gumbel: float | None = None, invert: bool = False,
                  progress: bool = False, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Inpainting on codes. Returns (codes (B*v, N, K) uint8, token mask (B*v, N) bool, True = generated).

    images: (B,3,S,S) in [0,1] at the tokenizer's size; masks: pixel masks (white / True = regenerate).
    labels: None (null class, the spec's default), one class id for all, one per image, or (B, C+1)
    class weights. ``invert`` regenerates the complement of the mask (outpainting). ``sampling``: any
    of cfg_schedule, gumbel_schedule, temperature, deterministic, greedy (as in ``BiGR.generate``)."""
    _check_pair(model, bae)
    _check_variations(variations)
    images = _check_images(bae, images)
    B, G, v = images.shape[0], bae.cfg.grid, int(variations)
    tmask = token_mask(masks, G, images.shape[-2:], batch=B)
    if invert:
        tmask = ~tmask
    empty = (~tmask.any(1)).nonzero().flatten().tolist()
    if empty:
        which = "the mask" if B == 1 else f"the mask of image {empty[0]}"
        raise BigrError(f"nothing to regenerate: {which} selects no token; mark (in white) a region of at least one "
                        f"{bae.cfg.downsample}x{bae.cfg.downsample}-pixel token cell"
                        + (" (outpainting regenerates what the mask leaves black)" if invert else ""))
    labels, null = _labels(model, labels, B, v)
    opts = model.sampling_options(cfg=1.0 if null else cfg, iters=iters, steps=steps, gumbel=gumbel, seed=seed,
                                  **sampling)
    idx = _sample_index(B, v, _device(bae))
    codes = _encode(bae, images, v, seed, idx)
    mask = tmask.repeat_interleave(v, dim=0).to(model.device)
    out = _fill(model, codes.to(model.device), mask, labels, opts, idx.to(model.device), progress)
    return out, mask


def decode_codes(bae, codes: torch.Tensor) -> torch.Tensor:
    """Codes (B,N,K) -> images (B,3,S,S) float32 in [0,1] on the tokenizer's device."""
    with torch.no_grad():
        return bae.decode(codes.to(_device(bae))).float()


def inpaint(model, bae, images: torch.Tensor, masks, labels=None, *, variations: int = 1, seed: int = 0,
            iters: int | None = None, steps: int | None = None, cfg: float | None = None, gumbel: float | None = None, progress: bool = False,
            **sampling) -> torch.Tensor:
    """Regenerate the masked (white) part of each image -> images (B*variations, 3, S, S) in [0, 1].

    Result j of image i is row i*variations + j. See ``inpaint_codes`` for the arguments."""
    codes, _ = inpaint_codes(model, bae, images, masks, labels, variations=variations, seed=seed, iters=iters,
                             steps=steps, cfg=cfg, gumbel=gumbel, progress=progress, **sampling)
    return decode_codes(bae, codes)


def outpaint_codes(model, bae, images: torch.Tensor, masks, labels=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Outpainting on codes: inpainting with the inverted mask (white = keep)."""
    return inpaint_codes(model, bae, images, masks, labels, invert=True, **kw)


def outpaint(model, bae, images: torch.Tensor, masks, labels=None, **kw) -> torch.Tensor:
    """Keep the masked (white) part of each image and regenerate the rest -> (B*variations, 3, S, S)."""
    codes, _ = outpaint_codes(model, bae, images, masks, labels, **kw)
    return decode_codes(bae, codes)


def edit_codes(model, bae, images: torch.Tensor, masks, label, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional editing on codes: inpainting guided by ``label`` (one id, or one per image), with CFG."""
    if label is None:
        raise BigrError("editing needs a class: pass label=<class id>")
    return inpaint_codes(model, bae, images, masks, label, **kw)


def edit(model, bae, images: torch.Tensor, masks, label, **kw) -> torch.Tensor:
    """Regenerate the masked part of each image as class ``label`` -> images (B*variations, 3, S, S).
    Keyword arguments as in ``inpaint_codes`` (cfg mixes the class with the null class)."""
    codes, _ = edit_codes(model, bae, images, masks, label, **kw)
    return decode_codes(bae, codes)


# ---- class interpolation -----------------------------------------------------------------------

@torch.no_grad()
def interpolate_codes(model, label_a: int, label_b: int, weights: Sequence[float], *, variations: int = 1,
                      seed: int = 0, iters: int | None = None, steps: int | None = None, cfg: float | None = None, gumbel: float | None = None,
                      progress: bool = False, reuse=None, **sampling) -> torch.Tensor:
    """Generation conditioned on w*table[a] + (1-w)*table[b] for each w in ``weights`` -> codes
    (variations*len(weights), N, K), variation-major (row j*len(weights) + k is weight k, variation j).

    Every weight of variation j uses sample index j, so a row differs from its neighbours only by the
    condition; with w = 1 it equals ``model.generate([label_a], seed=seed, sample_index=[j], ...)``.
    Weights outside [0, 1] extrapolate. reuse: state reuse across iterations, as in ``model.generate``."""
    _check_variations(variations)
    C = model.cfg.num_classes + 1
    ab = model.check_labels([label_a, label_b]).tolist()
    w = torch.as_tensor(list(weights) if not isinstance(weights, torch.Tensor) else weights, dtype=torch.float32).reshape(-1)
    if w.numel() == 0:
        raise BigrError("pass at least one interpolation weight (e.g. 1,0.75,0.5,0.25,0)")
    if not bool(torch.isfinite(w).all()):
        raise BigrError("interpolation weights must be finite numbers")
    onehot = torch.eye(C, dtype=torch.float32)
    rows = w[:, None] * onehot[ab[0]] + (1 - w[:, None]) * onehot[ab[1]]
    v = int(variations)
    labels = rows.repeat(v, 1).to(model.device)
    idx = torch.arange(v, device=model.device).repeat_interleave(w.numel())
    opts = model.sampling_options(cfg=cfg, iters=iters, steps=steps, gumbel=gumbel, seed=seed, **sampling)
    return _generate(model, labels, opts, idx, progress, reuse)


def interpolate(model, bae, label_a: int, label_b: int, weights: Sequence[float], **kw) -> torch.Tensor:
    """Images along the class interpolation a -> b: (variations*len(weights), 3, S, S) in [0, 1].
    See ``interpolate_codes``."""
    _check_pair(model, bae)
    return decode_codes(bae, interpolate_codes(model, label_a, label_b, weights, **kw))


# ---- enrichment --------------------------------------------------------------------------------

def _round_seed(seed: int, r: int) -> int:
    """A 63-bit seed for round r, derived from the user's seed by the RNG's hash."""
    h = rng.random_bits(seed, torch.zeros(1, dtype=torch.long), rng.stream(rng.ENCODE, rng.ENCODE_ROUND, r), 2)[0].tolist()
    return int(h[0]) | (int(h[1]) & 0x7FFFFFFF) << 32


def enrich_groups(grid: int, ds: int, rounds: int, seed: int, sample_index: torch.Tensor) -> torch.Tensor:
    """(B, grid*grid) long: the round (0..rounds-1) in which each token is re-masked.

    The grid is cut into ds x ds blocks; in each block the ds*ds positions are put in a random order
    (keyed by seed and sample index) and split into ``rounds`` equal groups."""
    if ds < 1 or grid % ds:
        raise BigrError(f"ds must divide the token grid side {grid}, got {ds}")
    n = ds * ds
    if rounds < 1 or n % rounds:
        raise BigrError(f"a {ds}x{ds} block has {n} positions, which cannot be split into {rounds} equal groups; "
                        f"pick ds and rounds with ds*ds a multiple of rounds (e.g. ds=2, rounds=4)")
    B, nb = sample_index.shape[0], grid // ds
    keys = rng.uniform(seed, sample_index, rng.stream(rng.ENCODE, rng.ENCODE_SHUFFLE), (grid * grid,))
    blocks = keys.view(B, nb, ds, nb, ds).permute(0, 1, 3, 2, 4).reshape(B, nb, nb, n)
    order = torch.sort(blocks, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    group = rank * rounds // n
    return group.view(B, nb, nb, ds, ds).permute(0, 1, 3, 2, 4).reshape(B, grid * grid)


def upsample_to_tokenizer(bae, low_res: torch.Tensor) -> torch.Tensor:
    """Square images (B,3,h,w) -> (B,3,S,S) at the tokenizer's size, bilinear (antialiased when shrinking)."""
    if not isinstance(low_res, torch.Tensor) or not low_res.is_floating_point():
        raise BigrError("low-resolution images must be a float tensor (B, 3, h, w) in [0, 1]")
    if low_res.dim() == 3:
        low_res = low_res[None]
    if low_res.dim() != 4 or low_res.shape[1] != 3:
        raise BigrError(f"low-resolution images must be (B, 3, h, w), got shape {tuple(low_res.shape)}")
    h, w = low_res.shape[-2:]
    if h != w:
        raise BigrError(f"enrichment takes square images, got {w}x{h}; centre-crop them first")
    S = bae.cfg.img_size
    if h == S:
        return low_res.float()
    return F.interpolate(low_res.float(), size=(S, S), mode="bilinear", align_corners=False, antialias=h > S).clamp(0, 1)


@torch.no_grad()
def enrich_codes(model, bae, low_res_images: torch.Tensor, labels=None, *, ds: int = 2, rounds: int = 4,
                 variations: int = 1, seed: int = 0, iters: int | None = None, steps: int | None = None,
                 cfg: float | None = None, gumbel: float | None = None, return_history: bool = False, progress: bool = False, **sampling):
    """Enrichment on codes -> codes (B*v, N, K) uint8; with ``return_history`` -> (codes, history, groups):
    history[0] is the encoded upsampled image and history[r+1] the codes after round r; groups (B*v, N)
    gives each token's round (see ``enrich_groups``).

    Each image is upsampled bilinearly to the tokenizer's size and encoded (Bernoulli bits); then in each
    of ``rounds`` rounds one group of positions (a 1/rounds share of every ds x ds token block) is
    re-masked and inpainted with the null class (or ``labels``). A round changes only its own positions.
    Round r samples with a seed derived from (seed, r), so the rounds draw independent noise."""
    _check_pair(model, bae)
    _check_variations(variations)
    images = _check_images(bae, upsample_to_tokenizer(bae, low_res_images))
    B, v = images.shape[0], int(variations)
    rounds, ds = int(rounds), int(ds)
    idx = _sample_index(B, v, model.device)
    groups = enrich_groups(bae.cfg.grid, ds, rounds, seed, idx)
    labels, null = _labels(model, labels, B, v)
    opts = [model.sampling_options(cfg=1.0 if null else cfg, iters=iters, steps=steps, gumbel=gumbel,
                                   seed=_round_seed(seed, r), **sampling) for r in range(rounds)]
    codes = _encode(bae, images, v, seed, idx)
    codes = codes.to(model.device)
    history = [codes]
    for r in range(rounds):
        codes = sampler.generate(model, labels, opts[r], idx, progress, codes=codes, mask=groups == r, schedule="linear")
        history.append(codes)
    return (codes, history, groups) if return_history else codes


def enrich(model, bae, low_res_images: torch.Tensor, labels=None, **kw) -> torch.Tensor:
    """Enrich low-resolution images with detail -> (B*variations, 3, S, S) in [0, 1]. See ``enrich_codes``."""
    return decode_codes(bae, enrich_codes(model, bae, low_res_images, labels, **kw))
