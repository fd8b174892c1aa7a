"""Quality of the bundled text-to-image model: does it draw what the prompt asks for?

    python tools/text_quality_report.py [--per-prompt 10]

- Class agreement: a classifier trained on real Fashion-MNIST images (tools/quality_report.py's SmallCNN, cached
  under runs/quality) labels images generated from prompts that name a class, for prompts in the training phrasings
  and, separately, in held-out phrasings (templates and synonyms never seen in training). Reported: the fraction
  labelled as the prompt's class (targets 80% and 70%).
- Attributes: for each class, images from "a dark X" vs "a light X" prompts (mean intensity of the item's pixels, as
  the captions measured it for training) and "a narrow X" vs "a wide X" (the item's width in pixels), their means
  and the shift between them.
- Sample sheets: a row per prompt.
Writes bench/results/default-text-model/quality.{json,md} and samples_*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bigr_engine.io.images import decode_to_uint8, make_grid, png_bytes  # noqa: E402
from bigr_engine.train import captions, fashion_mnist as fm  # noqa: E402
from quality_report import get_classifier, predict  # noqa: E402


def generate(model, bae, prompts: list[str], per_prompt: int, seed: int, batch: int = 50) -> np.ndarray:
    """-> (len(prompts) * per_prompt, 32, 32, 3) uint8; image i of prompt j has sample index j * per_prompt + i."""
    labels = [p for p in prompts for _ in range(per_prompt)]
    out = []
    for lo in range(0, len(labels), batch):
        part = labels[lo:lo + batch]
        codes = model.generate(part, seed=seed, sample_index=torch.arange(lo, lo + len(part)))
        out.append(decode_to_uint8(bae, codes))
    return np.concatenate(out)


def encoder_agreement(encoder, rows: list, train_rows: list) -> float:
    """Without the generator: the fraction of `rows`' captions whose nearest training caption (cosine of the
    mask-averaged text-encoder embeddings, as sentence-transformers pools MiniLM) names the same class. What the text
    encoder alone tells apart; a held-out word the encoder cannot read scores low here whatever the model learns."""
    def pooled(texts):
        out = []
        for i in range(0, len(texts), 256):
            e, m = encoder(texts[i:i + 256])
            m = m.float()[..., None]
            out.append(torch.nn.functional.normalize((e * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)
    near = (pooled([t for _, t in rows]) @ pooled([t for _, t in train_rows]).T).argmax(1)
    train_cls = torch.tensor([c for c, _ in train_rows])
    return float((train_cls[near] == torch.tensor([c for c, _ in rows])).float().mean())


def gray28(images: np.ndarray) -> np.ndarray:
    return images.mean(-1)[:, 2:30, 2:30].round().astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-prompt", type=int, default=10)
    ap.add_argument("--work", default=str(ROOT / "runs" / "quality"), help="the classifier's cache")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "default-text-model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    from bigr_engine.io.default import load_default_text
    model, bae = load_default_text()
    train_x, train_y = fm.load("train")
    test_x, test_y = fm.load("test")
    clf, clf_acc = get_classifier(Path(a.work), dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y), 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"classifier_test_accuracy": clf_acc, "per_prompt": a.per_prompt, "seed": a.seed,
              "sampling": dataclasses.asdict(model.default_sampling)}

    # class agreement: one prompt per (class, template, synonym), no attributes
    splits = (("train_phrasings", "train"), ("held_out_phrasings", "held_out"),
              ("held_out_readable_phrasings", "held_out_readable"))
    train_rows = [(c, t) for c, t, b, w in captions.caption_table("train") if b < 0 and w < 0]
    for split, held in splits:
        rows = [(c, t) for c, t, b, w in captions.caption_table(held) if b < 0 and w < 0]
        prompts = [t for _, t in rows]
        want = np.repeat([c for c, _ in rows], a.per_prompt)
        imgs = generate(model, bae, prompts, a.per_prompt, a.seed)
        pred = predict(clf, gray28(imgs))
        per_class = [float((pred[want == c] == c).mean()) for c in range(10)]
        report[split] = {"prompts": len(prompts), "images": len(pred), "agreement": float((pred == want).mean()),
                         "per_class": per_class,
                         "encoder_nearest_caption_agreement": encoder_agreement(model.text_encoder, rows, train_rows)}
        pick = [i for i, (c, _) in enumerate(rows) if i % max(1, len(rows) // 20) == 0][:20]
        sheet = np.concatenate([imgs[i * a.per_prompt:(i + 1) * a.per_prompt] for i in pick])
        (out / f"samples_{split}.png").write_bytes(png_bytes(make_grid(sheet, a.per_prompt)))
        report[split]["sheet_prompts"] = [rows[i][1] for i in pick]

    # attributes: "a dark X" vs "a light X", "a narrow X" vs "a wide X", with the first training synonym
    attrs = {}
    for name, pair in (("brightness", captions.BRIGHTNESS), ("width", captions.WIDTH)):
        rows = []
        for c, (syn, _) in captions.SYNONYMS.items():
            prompts = [captions.caption("a {attr}{item}", syn[0], [v]) for v in pair]
            imgs = generate(model, bae, prompts, a.per_prompt, a.seed + 1)
            m = captions.measure(gray28(imgs), np.repeat([c, c], a.per_prompt))
            key = "mean" if name == "brightness" else "extent"
            lo, hi = m[key][:a.per_prompt].mean(), m[key][a.per_prompt:].mean()
            rows.append({"class": fm.CLASSES[c], pair[0]: float(lo), pair[1]: float(hi), "shift": float(hi - lo)})
        attrs[name] = {"per_class": rows, "mean_shift": float(np.mean([r["shift"] for r in rows])),
                       "classes_shifted_the_right_way": int(sum(r["shift"] > 0 for r in rows))}
    report["attributes"] = attrs
    report["seconds"] = round(time.time() - t0, 1)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Bundled text-to-image model: quality (`python tools/text_quality_report.py --per-prompt {a.per_prompt}`)",
          "",
          f"Classifier (SmallCNN on real train images) test accuracy: {clf_acc:.3f}.",
          "",
          "| phrasings | prompts | images | class agreement | encoder alone: nearest training caption's class |",
          "|---|---|---|---|---|"]
    for split, _ in splits:
        r = report[split]
        md.append(f"| {split.replace('_', ' ')} | {r['prompts']} | {r['images']} | {r['agreement']:.3f} | "
                  f"{r['encoder_nearest_caption_agreement']:.3f} |")
    md += ["", "Held-out phrasings: the two held-out templates with the held-out synonyms (`captions.SYNONYMS`); held out "
               "readable: the same templates with `captions.HELD_OUT_READABLE`, synonyms made only of whole words of "
               "MiniLM's vocabulary (the rule and why are in bigr_engine/train/captions.py). The last column needs no "
               "generator: how often the nearest training caption in the encoder's pooled embedding names the "
               "prompt's class (1.0 for the training phrasings by construction).", "",
           "Per class (class agreement):", "", "| class | " + " | ".join(s.replace("_", " ") for s, _ in splits) + " |",
           "|---|" + "---|" * len(splits)]
    md += [f"| {fm.CLASSES[c]} | " + " | ".join(f"{report[s]['per_class'][c]:.2f}" for s, _ in splits) + " |"
           for c in range(10)]
    for name, r in attrs.items():
        lo, hi = (captions.BRIGHTNESS if name == "brightness" else captions.WIDTH)
        unit = "mean item intensity (0-1)" if name == "brightness" else "item width (pixels)"
        md += ["", f"**{name}** ({unit}; '{lo}' vs '{hi}' prompts): mean shift {r['mean_shift']:+.3f}, the right way "
                   f"in {r['classes_shifted_the_right_way']} of 10 classes", "",
               f"| class | {lo} | {hi} | shift |", "|---|---|---|---|"]
        md += [f"| {x['class']} | {x[lo]:.3f} | {x[hi]:.3f} | {x['shift']:+.3f} |" for x in r["per_class"]]
    md += ["", "Sample sheets: `samples_train_phrasings.png`, `samples_held_out_phrasings.png`, "
               "`samples_held_out_readable_phrasings.png` (a row per prompt; the prompts are listed in quality.json).",
           ""]
    (out / "quality.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
