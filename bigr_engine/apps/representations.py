"""Visual representations of a BiGR model (paper sec. 3.2) and the linear-probe protocol.

``embed`` encodes images with the B-AE (deterministic bits, p > 0.5), feeds the unmasked codes with the
null class, and pools the residual stream after a chosen layer (``BiGR.representation``).
``linear_probe`` trains BatchNorm1d(affine=False) + Linear on frozen features with LARS, a linear
warm-up and a cosine decay, and reports top-1 / top-5 accuracy. ``tsne`` / ``tsne_plot`` draw a 2-D map
of features (exact t-SNE, PIL only). All are deterministic given their seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bigr_engine.errors import BigrError
from bigr_engine.io.files import write_file_atomic

__all__ = ["embed", "LARS", "ProbeResult", "linear_probe", "accuracy", "tsne", "tsne_plot"]


def _batches(source, batch_size: int):
    """Yield (images, labels or None) from a tensor (n,3,S,S) or an iterable of tensors / (images, labels)."""
    if isinstance(source, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(source)
        if x.dim() == 3:
            x = x[None]
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], None
        return
    for item in source:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise BigrError("a data loader must yield image tensors or (images, labels) pairs")
            yield torch.as_tensor(item[0]), torch.as_tensor(item[1]).reshape(-1)
        else:
            yield torch.as_tensor(item), None


@torch.no_grad()
def embed(model, bae, images_or_loader, layer: int | None = None, labels=None, batch_size: int = 64, return_labels: bool = False,
          progress: bool = False):
    """Pooled features (n, D) float32 on the CPU, one row per image.

    images_or_loader: a float tensor (n, 3, S, S) in [0, 1] at the tokenizer's size, or an iterable yielding
    such batches or (images, labels) pairs (e.g. ``datasets.image_folder``). layer: the last transformer
    block to run (0-based; default ``model.default_layer()``: the paper's 10 / 15 / 32 for L / XL / XXL, counting
    from 1, the middle block otherwise). labels: the
    condition class (None = the null class, as in the paper; or one class id for every image).
    With ``return_labels`` -> (features, dataset labels (n,) int64), which the loader must yield."""
    from bigr_engine.io.checkpoints import check_pair
    check_pair(model, bae)
    if int(batch_size) < 1:
        raise BigrError(f"batch_size must be positive, got {batch_size}")
    if layer is None:
        layer = model.default_layer()
    if not 0 <= int(layer) < model.cfg.n_layer:
        raise BigrError(f"layer {layer} is out of range: this model has layers 0..{model.cfg.n_layer - 1}")
    dev_bae = next(bae.parameters()).device
    feats, ys = [], []
    batches = _batches(images_or_loader, int(batch_size))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="embed", unit="batch", leave=False)
    for x, y in batches:
        if not x.is_floating_point():
            raise BigrError(f"images must be float in [0, 1], got {x.dtype}; divide 8-bit images by 255")
        codes = bae.encode(x.to(dev_bae), deterministic=True)
        cond = None
        if labels is not None:
            cond = torch.as_tensor(labels).reshape(-1)
            cond = cond.expand(codes.shape[0]) if cond.numel() == 1 else cond
        feats.append(model.representation(codes.to(model.device), int(layer), cond).float().cpu())
        if return_labels:
            if y is None:
                raise BigrError("return_labels needs a source that yields (images, labels) pairs, e.g. an image folder")
            ys.append(y.long().cpu())
    if not feats:
        raise BigrError("no images to embed: the source is empty")
    out = torch.cat(feats)
    return (out, torch.cat(ys)) if return_labels else out


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017).

    For a parameter with more than one dimension the step direction g (+ weight_decay * p) is rescaled by
    trust_coefficient * ||p|| / ||g|| (1 when either norm is 0); one-dimensional parameters (biases,
    norms) get neither weight decay nor the rescaling. Then buf = momentum * buf + g; p -= lr * buf."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise BigrError("LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.dim() > 1:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * p_norm / g_norm.clamp_min(1e-30),
                                        torch.ones_like(p_norm))
                    g = g * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


@dataclass
class ProbeResult:
    top1: float            # fraction of test samples whose label is the top prediction
    top5: float            # ... is among the top min(5, classes) predictions
    classes: int
    head: nn.Module        # the trained BatchNorm1d + Linear (eval mode, on the CPU)

    def __str__(self) -> str:
        return f"top-1 {100 * self.top1:.2f}%  top-5 {100 * self.top5:.2f}%"


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().float().cpu()
    if t.dim() != 2 or t.shape[0] == 0:
        raise BigrError(f"{name} must be a non-empty (n, D) array, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise BigrError(f"{name} holds NaN or infinite values")
    return t


def _as_labels(y, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().cpu()
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise BigrError(f"{name} must be integer class ids")
        t = t.round()
    t = t.long().reshape(-1)
    if t.shape[0] != n:
        raise BigrError(f"{name} has {t.shape[0]} entries for {n} feature rows; pass one label per row")
    if t.numel() and int(t.min()) < 0:
        raise BigrError(f"{name} holds a negative class id ({int(t.min())}); classes must be 0..C-1")
    return t


def linear_probe(train_feats, train_labels, test_feats, test_labels, *, epochs: int = 90, batch_size: int = 256,
                 base_lr: float = 0.1, lr: float | None = None, warmup_epochs: int = 10, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, seed: int = 0,
                 num_classes: int | None = None, device="cpu") -> ProbeResult:
    """The paper's linear probe on frozen features -> ProbeResult(top1, top5, ...).

    Head: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, C) (weights ~ N(0, 0.01), bias 0). Optimiser:
    LARS (momentum 0.9, no weight decay by default), learning rate ``lr`` (default base_lr * batch_size / 256),
    warmed up linearly over ``warmup_epochs`` and decayed with a cosine to 0, both per step; cross-entropy
    loss; the training set is reshuffled every epoch. The BatchNorm keeps a cumulative average of the batch
    statistics (momentum=None), so its test-time normalisation is the training set's. Everything random comes
    from ``seed`` and runs on ``device`` (CPU by default), so a run is reproducible."""
    xtr, xte = _as_features(train_feats, "train features"), _as_features(test_feats, "test features")
    ytr, yte = _as_labels(train_labels, xtr.shape[0], "train labels"), _as_labels(test_labels, xte.shape[0], "test labels")
    if xtr.shape[1] != xte.shape[1]:
        raise BigrError(f"train features have {xtr.shape[1]} dimensions but test features {xte.shape[1]}; "
                        f"embed both with the same model and layer")
    C = int(max(int(ytr.max()), int(yte.max()) if yte.numel() else 0)) + 1
    if num_classes is not None:
        if C > num_classes:
            raise BigrError(f"labels go up to {C - 1} but num_classes is {num_classes}")
        C = int(num_classes)
    if int(epochs) < 1 or int(batch_size) < 1:
        raise BigrError("epochs and batch_size must be positive")
    if not 0 <= int(warmup_epochs) <= int(epochs):
        raise BigrError(f"warmup_epochs must be in 0..epochs ({epochs}), got {warmup_epochs}")
    gen = torch.Generator().manual_seed(int(seed))
    D = xtr.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(D, affine=False, eps=1e-6, momentum=None), nn.Linear(D, C))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=gen)
        head[1].bias.zero_()
    head = head.to(device)
    peak = float(lr) if lr is not None else base_lr * batch_size / 256
    opt = LARS(head.parameters(), lr=peak, momentum=momentum, weight_decay=weight_decay,
               trust_coefficient=trust_coefficient)
    n = xtr.shape[0]
    bs = min(int(batch_size), n)
    per_epoch = math.ceil(n / bs)
    total, warm = int(epochs) * per_epoch, int(warmup_epochs) * per_epoch
    xtr_d, ytr_d = xtr.to(device), ytr.to(device)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    head.train()
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            if idx.numel() < 2:          # BatchNorm needs two rows; a lone last row is skipped
                step += 1
                continue
            if step < warm:
                rate = peak * (step + 1) / warm
            else:
                rate = peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = rate
            opt.zero_grad(set_to_none=True)
            loss_fn(head(xtr_d[idx]), ytr_d[idx]).backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(xte[i:i + 4096].to(device)).cpu() for i in range(0, xte.shape[0], 4096)])
    return ProbeResult(top1=accuracy(logits, yte, 1), top5=accuracy(logits, yte, 5), classes=C, head=head.cpu())


# ---- t-SNE (exact, O(n^2); for a few thousand points) -----------------------------------------------

def _row_affinities(d2: torch.Tensor, perplexity: float, tries: int = 64) -> torch.Tensor:
    """Conditional affinities p(j|i) = exp(-beta_i d2_ij) / sum, with beta_i found by bisection so that each
    row's entropy is log(perplexity). d2 (n, n) squared distances, float64."""
    n = d2.shape[0]
    d2 = d2.clone()
    d2.fill_diagonal_(float("inf"))
    target = math.log(perplexity)
    lo = torch.full((n, 1), -30.0, dtype=d2.dtype)          # bisection on log(beta)
    hi = torch.full((n, 1), 30.0, dtype=d2.dtype)
    scale = d2[torch.isfinite(d2)].median().clamp_min(1e-12)  # work with distances of order 1
    d2 = d2 / scale
    for _ in range(tries):
        mid = (lo + hi) / 2
        beta = mid.exp()
        logits = -beta * d2
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        p = logp.exp()
        entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(1, keepdim=True)
        too_flat = entropy > target          # entropy too high: sharpen (larger beta)
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    return p


def tsne(feats, *, perplexity: float = 30.0, iters: int = 1000, seed: int = 0, pca_dims: int = 50) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton 2008) of (n, D) features -> (n, 2) float32 coordinates.

    Features are centred and reduced to ``pca_dims`` by PCA, affinities use the given perplexity (capped at
    (n-1)/3), then gradient descent with early exaggeration (12 for the first 250 iterations), momentum 0.5
    then 0.8 and per-coordinate gains. Deterministic given ``seed``. Memory and time grow as n^2: meant
    for up to a few thousand points."""
    x = _as_features(feats, "features").double()
    n = x.shape[0]
    if n < 4:
        raise BigrError(f"t-SNE needs at least 4 points, got {n}")
    if n > 20000:
        raise BigrError(f"{n} points is too many for exact t-SNE (memory grows as n^2); subsample to a few thousand")
    x = x - x.mean(0)
    if x.shape[1] > pca_dims:
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        x = x @ v[:pca_dims].T
    perplexity = min(float(perplexity), (n - 1) / 3)
    p = _row_affinities(torch.cdist(x, x).pow(2), perplexity)
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(int(seed))
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 1e-4
    lr = max(n / 12 / 4, 50.0)
    velocity = torch.zeros_like(y)
    gains = torch.ones_like(y)
    for it in range(int(iters)):
        exaggeration = 12.0 if it < 250 else 1.0
        momentum = 0.5 if it < 250 else 0.8
        num = 1.0 / (1.0 + torch.cdist(y, y).pow(2))
        num.fill_diagonal_(0.0)
        q = (num / num.sum()).clamp_min(1e-12)
        w = (exaggeration * p - q) * num
        grad = 4.0 * (w.sum(1, keepdim=True) * y - w @ y)
        same = (grad > 0) == (velocity > 0)
        gains = torch.where(same, gains * 0.8, gains + 0.2).clamp_min(0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
        y = y - y.mean(0)
    return y.float().numpy()


# A colour per class (cycled past 20), chosen to be told apart on white.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
            "#dbdb8d", "#9edae5"]


def tsne_plot(feats, labels, path, *, class_names: list[str] | None = None, perplexity: float = 30.0,
              iters: int = 1000, seed: int = 0, size: int = 800) -> np.ndarray:
    """t-SNE of features, drawn as a PNG scatter plot coloured by label (with a legend) -> the 2-D coordinates.
    Uses only PIL; see ``tsne`` for the embedding."""
    from PIL import Image, ImageDraw
    x = _as_features(feats, "features")
    y = _as_labels(labels, x.shape[0], "labels").numpy()
    pts = tsne(x, perplexity=perplexity, iters=iters, seed=seed)
    classes = sorted(set(y.tolist()))
    names = {c: (class_names[c] if class_names and c < len(class_names) else str(c)) for c in classes}
    legend_w = 20 + 8 * max(len(names[c]) for c in classes)
    margin = 20
    img = Image.new("RGB", (size + legend_w, size), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = pts.min(0), pts.max(0)
    span = np.maximum(hi - lo, 1e-9)
    xy = margin + (pts - lo) / span * (size - 2 * margin)
    order = np.random.RandomState(seed).permutation(len(xy))   # no class is always drawn on top
    for i in order:
        px, py = xy[i]
        draw.ellipse((px - 3, size - py - 3, px + 3, size - py + 3), fill=_PALETTE[y[i] % len(_PALETTE)])
    for k, c in enumerate(classes):
        top = margin + 16 * k
        draw.rectangle((size + 4, top + 2, size + 12, top + 10), fill=_PALETTE[c % len(_PALETTE)])
        draw.text((size + 16, top), names[c], fill="black")
    write_file_atomic(path, lambda f: img.save(f, format="PNG"))
    return pts
