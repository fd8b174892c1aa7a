"""State reuse across iterations: speed, quality and drift of the reuse tiers (sampling.reuse).

    python bench/reuse.py time                                 # bundled model: ms/image per config, ratio to exact
    python bench/reuse.py time --preset BiGR-L --batch 2 --iters 10 --steps 25   # random weights at BiGR-L shapes
    python bench/reuse.py quality --n 1000                     # bundled model: accuracy, FD, bit agreement (cached)
    python bench/reuse.py time --preset bundled-text           # the bundled text model (prompts encoded beforehand)
    python bench/reuse.py quality --preset bundled-text --n 1000   # its class agreement, FD, bit agreement
    python bench/reuse.py drift                                # teacher-forced K/V and p0 drift per layer and round
    python bench/reuse.py plot                                 # the speed/quality frontier from the rows written

A config is a preset name with optional parameters: "exact", "fast", "fast:refresh=0", "fast:active=3,warmup=3"
(sampling.reuse.Reuse's fields). `time` runs every config in one process, the exact engine first, each warmed up and
timed --repeats times (median), and appends rows to bench/results/<device>/reuse.{csv,jsonl}. `quality` generates
--n samples per config on the bundled model at its tuned settings (sample i: class i % 10, index i, seed 0; cached
in chunks under --work so a stopped run resumes), then scores them as tools/quality_report.py does (classifier
accuracy; Frechet distance on EfficientNet-Lite0 features against --fd-ref test images, beside the floor of as many
real train images) and counts the bits that agree with the exact engine's codes; -> bench/results/default-model/
reuse_quality.{json,md} (bench/results/default-text-model/ for --preset bundled-text: sample i asks for class i % 10
with the prompt "a photo of a <its first training synonym>", and accuracy is the classifier's agreement with that class).
`plot` draws bench/results/default-model/reuse_frontier.png (speed-up vs accuracy and FD).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
import bigr_engine as be  # noqa: E402
from bigr_engine.sampling import engine  # noqa: E402
from bigr_engine.sampling.reuse import FIELDS, resolve_reuse  # noqa: E402
from generate import PRESETS, device_name, time_one, write_results  # noqa: E402

DEFAULT_CONFIGS = ["exact", "fast", "fast:warmup=2", "fast:refresh=5", "fast:warmup=2,refresh=0",
                   "fast:refresh=0,active=1.5", "fast:refresh=0,active=1,sweep=6", "fast:refresh=0,active=1.5,sweep=4",
                   "fast:refresh=8,active=1.5,sweep=3"]
QUALITY_DIR = ROOT / "bench" / "results" / "default-model"
TEXT_QUALITY_DIR = ROOT / "bench" / "results" / "default-text-model"
CHUNK = 100


def parse_config(text: str) -> dict:
    """"fast:refresh=0,active=3" -> {"preset": "fast", "refresh": 0, "active": 3.0}."""
    name, _, rest = text.partition(":")
    spec = {"preset": name}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in FIELDS:
            raise SystemExit(f"unknown reuse parameter {key!r} in {text!r}; valid: {', '.join(FIELDS[1:])}")
        spec[key] = float(value) if key == "active" else (value.lower() in ("1", "true")) if key in ("layer0", "cache") \
            else int(value)
    resolve_reuse(spec)   # errors now, before any work
    return spec


def cache_name(spec: dict) -> str:
    """The folder of a config's cached samples: its resolved parameters, so a preset whose definition changes never
    reads another definition's samples."""
    r = resolve_reuse(spec)
    name = f"layer0{int(r.layer0)}_cache{int(r.cache)}_warmup{r.warmup}_refresh{r.refresh}_active{r.active:g}"
    return name + (f"_sweep{r.sweep}" if r.sweep else "")


def class_prompts() -> list[str]:
    """The text model's prompt for each class: a training template with the class's first training synonym."""
    from bigr_engine.train import captions
    return [captions.caption("a photo of a {attr}{item}", captions.SYNONYMS[c][0][0]) for c in range(10)]


def conditions_for(model, idx: torch.Tensor):
    """What sample i is conditioned on: class i % 10, or for a text model the condition tensor of that class's
    prompt (encoded once per call, outside the timed engine)."""
    if not model.cfg.is_text:
        return idx % model.cfg.num_classes
    from bigr_engine.models.text import pack_condition
    table = pack_condition(*model.text_encoder(class_prompts())).to(model.device)
    return table[idx % 10]


def load_model(args):
    if args.preset == "bundled":
        model, bae = be.load_default()
        return model.to(args.device).eval(), bae, model.default_sampling
    if args.preset == "bundled-text":
        from bigr_engine.io.default import load_default_text
        model, bae = load_default_text()
        return model.to(args.device).eval(), bae, model.default_sampling
    torch.manual_seed(0)
    cfg = be.BiGRConfig(**PRESETS[args.preset]) if args.preset in PRESETS else be.bigr_preset(args.preset)
    model = be.BiGR(cfg).to(args.device).eval()
    return model, None, model.default_sampling


# ---------------------------------------------------------------------------------------------- time

def cmd_time(args) -> None:
    model, _, opts = load_model(args)
    opts = opts.replace(**{k: v for k, v in dict(iters=args.iters, steps=args.steps, cfg=args.cfg).items()
                           if v is not None})
    gpu = args.device.startswith("cuda")
    batch = args.batch or (64 if gpu else 16)
    labels = conditions_for(model, torch.arange(batch))
    configs = args.configs or DEFAULT_CONFIGS
    if configs[0] != "exact":
        configs = ["exact"] + [c for c in configs if c != "exact"]
    print(f"{args.preset}: N={model.cfg.num_tokens}, batch {batch}, iters {opts.iters}, steps {opts.steps}, "
          f"cfg {opts.cfg} on {device_name(args.device)}")
    rows, exact_codes = [], None
    for text in ["off"] + configs:
        spec = parse_config(text)
        run = lambda: engine.generate(model, labels, opts, reuse=spec, dtype=args.dtype)  # noqa: E731
        codes = run()   # warm-up (and graph capture on GPU)
        if exact_codes is None and text == "exact":
            exact_codes = codes
        times = time_one(run, args.device, args.repeats)
        med = statistics.median(times)
        rows.append(dict(config=text, preset=args.preset, batch=batch, iters=opts.iters, steps=opts.steps,
                         cfg=opts.cfg, dtype=str(engine.resolve_dtype(args.dtype, model.device)).replace("torch.", ""),
                         seconds=med, ms_per_image=1e3 * med / batch, threads=torch.get_num_threads(), codes=codes))
        print(f"  {text:36s} {1e3 * med / batch:9.2f} ms/image  (median of {args.repeats}: "
              f"{', '.join(f'{t:.3f}' for t in times)} s)")
    base = next(r for r in rows if r["config"] == "exact")
    for r in rows:
        codes = r.pop("codes")
        r["speedup_vs_exact"] = base["seconds"] / r["seconds"]
        r["bit_agreement_vs_exact"] = (codes == exact_codes).float().mean().item()
        print(f"  {r['config']:36s} {r['speedup_vs_exact']:5.2f}x the exact engine, "
              f"{100 * r['bit_agreement_vs_exact']:6.2f}% of bits agree")
    write_results(args.out, "reuse", rows, args.device, args.argv)


# ---------------------------------------------------------------------------------------------- quality

def generate_chunks(work: Path, model, bae, spec: dict, name: str, n: int, seed: int = 0):
    """Samples 0..n-1 of a config (class i % 10, index i) -> (codes (n, N, K) uint8, gray 28x28 images (n, 28, 28))."""
    import quality_report as qr
    from tqdm.auto import tqdm
    folder = work / "gen" / name
    folder.mkdir(parents=True, exist_ok=True)
    chunks = range(n // CHUNK)
    todo = [c for c in chunks if not (folder / f"chunk_{c:04d}.npz").is_file()]
    seconds = 0.0
    for c in tqdm(todo, desc=f"generate {name}", unit="chunk"):
        idx = torch.arange(c * CHUNK, (c + 1) * CHUNK)
        t = time.perf_counter()
        codes = engine.generate(model, conditions_for(model, idx), model.default_sampling.replace(seed=seed), idx,
                                reuse=spec)
        seconds += time.perf_counter() - t
        images = qr.generated_to_gray28(bae.decode(codes))
        tmp = folder / f"chunk_{c:04d}.tmp.npz"
        np.savez(tmp, codes=codes.numpy(), images=images)
        tmp.rename(folder / f"chunk_{c:04d}.npz")
    parts = [np.load(folder / f"chunk_{c:04d}.npz") for c in chunks]
    return np.concatenate([p["codes"] for p in parts]), np.concatenate([p["images"] for p in parts])


def cmd_quality(args) -> None:
    import quality_report as qr
    from bigr_engine.train import fashion_mnist as fm
    if args.n % CHUNK:
        raise SystemExit(f"--n must be a multiple of {CHUNK}")
    text = args.preset == "bundled-text"
    if args.preset not in ("bundled", "bundled-text"):
        raise SystemExit("quality runs on --preset bundled or bundled-text (it needs a trained model)")
    work = Path(args.work)
    if text and args.work == str(ROOT / "runs" / "reuse"):
        work = ROOT / "runs" / "reuse-text"
    model, bae, _ = load_model(argparse.Namespace(preset=args.preset, device="cpu"))
    train_x, train_y = fm.load("train")
    test_x, test_y = fm.load("test")
    data = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    clf, clf_acc = qr.get_classifier(ROOT / "runs" / "reuse", data, 3)
    net = {}
    test_f = qr.cached_features(work, f"test{args.fd_ref}", test_x[:args.fd_ref], net)
    subset = np.random.RandomState(0).permutation(len(train_x))[:args.n]
    floor = qr.frechet_distance(qr.cached_features(work, "train_perm_seed0", train_x[subset], net), test_f)
    configs = args.configs or DEFAULT_CONFIGS
    if "exact" not in configs:
        configs = ["exact"] + configs
    exact_codes = None
    results = []
    for text in ["exact"] + [c for c in configs if c != "exact"]:
        spec = parse_config(text)
        name = cache_name(spec)
        codes, images = generate_chunks(work, model, bae, spec, name, args.n)
        if exact_codes is None:
            exact_codes = codes
        labels = np.arange(len(images)) % 10
        acc = float(np.mean(qr.per_class_accuracy(qr.predict(clf, images), labels)))
        fd = qr.frechet_distance(qr.cached_features(work, f"gen_{name}_{args.n}", images, net), test_f)
        agree = float((codes == exact_codes).mean())
        results.append(dict(config=text, reuse=dataclasses.asdict(resolve_reuse(spec)), n=len(images), accuracy=acc,
                            fd=fd, bit_agreement_vs_exact=agree))
        print(f"  {text:36s} accuracy {100 * acc:5.1f}%  FD {fd:7.2f}  bits agreeing with exact {100 * agree:6.2f}%")
    base = results[0]
    for r in results:
        r["accuracy_delta_points"] = 100 * (r["accuracy"] - base["accuracy"])
        r["fd_ratio"] = r["fd"] / base["fd"]
    report = dict(command="python bench/reuse.py " + " ".join(args.argv or []), date=time.strftime("%Y-%m-%d"),
                  device=device_name("cpu"), sampling=model.default_sampling.__dict__, n=args.n, fd_ref=args.fd_ref,
                  fd_floor_train_vs_test=floor, classifier_test_accuracy=clf_acc, results=results,
                  fd_label=qr.FD_LABEL)
    if text:
        report["prompts"] = class_prompts()
    out = TEXT_QUALITY_DIR if text else QUALITY_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "reuse_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "reuse_quality.md").write_text(quality_markdown(report))
    print(f"wrote {out / 'reuse_quality.md'}")


def quality_markdown(r: dict) -> str:
    which = "the bundled text model" if "prompts" in r else "the bundled model"
    cond = ("the prompt of class i % 10 (" + "; ".join(f"'{p}'" for p in r["prompts"]) + ")") if "prompts" in r \
        else "class i % 10"
    lines = [f"# Quality cost of state reuse on {which}", "",
             f"Command: `{r['command']}` ({r['date']}, {r['device']}). {r['n']} samples per config (sample i: "
             f"{cond}, index i, seed 0) at the model's tuned sampling; classifier accuracy = mean per-class accuracy "
             f"of the small CNN of tools/quality_report.py (real test accuracy {100 * r['classifier_test_accuracy']:.2f}%); "
             f"{r['fd_label']}: the samples vs the first {r['fd_ref']} test images; floor: {r['n']} real train images "
             f"vs the same, {r['fd_floor_train_vs_test']:.2f}. Bit agreement: the fraction of code bits equal to the "
             f"exact engine's for the same seeds. Speed: bench/results/<device>/reuse.csv (`bench/reuse.py time`).", "",
             "| config | accuracy | vs exact (points) | FD | FD / exact's | bits agreeing with exact |",
             "|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['config']} | {100 * x['accuracy']:.1f}% | {x['accuracy_delta_points']:+.1f} | {x['fd']:.2f} | "
                     f"{x['fd_ratio']:.3f} | {100 * x['bit_agreement_vs_exact']:.2f}% |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- drift

@torch.no_grad()
def cmd_drift(args) -> None:
    """Teacher-forced drift along the exact engine's own trajectory: at every round, every layer's rotated keys and
    values and every masked token's p0 are recomputed in full and compared with the previous round's, for the tokens
    whose input did not change (still masked, or unmasked two or more rounds ago). This is what a cached round would
    reuse, and its error if it did. The transcoder samples (x_T and every step are Bernoulli draws keyed by the round),
    so p0 changes from round to round even in a fixed context: p0_mean_abs_change_same_draws recomputes it with the
    previous round's draws, the change the context alone makes. top-k kept: the fraction of this round's unmask
    choices (by confidence, no Gumbel) that the previous round's p0 would have made too."""
    from bigr_engine.ops import kernels as kernel_choice
    from bigr_engine.sampling import reuse as R
    from bigr_engine.sampling.reference import confidence
    model, _, opts = load_model(args)
    B = args.batch or 16
    labels = torch.arange(B) % model.cfg.num_classes
    kernels = kernel_choice.choose(model.device)
    state = R.ReuseState(R.Reuse("drift", layer0=False, cache=True), B, model.cfg.num_tokens, model.cfg.bits,
                         model.device)
    plan = engine._make_plan(model, opts, kernels, torch.float32, R.resolve_reuse("off"))
    rounds = plan.rounds
    N, K = model.cfg.num_tokens, model.cfg.bits
    codes = torch.zeros(B, N, K, dtype=torch.uint8)
    mask = torch.ones(B, N, dtype=torch.bool)
    _, sample_index, null = engine.prepare_batch(model, labels, None)
    cond = torch.cat([labels, null])
    prev_k = prev_v = prev_p0 = None
    changed_before = torch.zeros(B, N, dtype=torch.bool)
    rows = []
    for i, r in enumerate(rounds):
        rr = R.RoundReuse(True, 0, 0, r.n)
        z = R.conditions_full(model, codes, mask, cond, kernels, state, rr, 2)
        idx = R.first_true(mask, r.n)
        zm = torch.gather(z, 1, idx.repeat(2, 1)[..., None].expand(-1, -1, z.shape[-1]))
        cz = model.transcoder.c_embedder(zm.reshape(2 * B * r.n, -1))
        p0 = engine.transcode_masked(model.transcoder, cz, plan.temb, plan.steps, r.cfg, True, opts, plan.tables,
                                     sample_index, r.iteration, idx[..., None] * K + torch.arange(K), kernels)
        full_p0 = torch.zeros(B, N, K).scatter(1, idx[..., None].expand(-1, -1, K), p0)
        if i:   # the same with the previous round's transcoder draws: the change due to the context alone
            p0_same_draws = engine.transcode_masked(model.transcoder, cz, plan.temb, plan.steps, r.cfg, True, opts,
                                                    plan.tables, sample_index, rounds[i - 1].iteration,
                                                    idx[..., None] * K + torch.arange(K), kernels)
            same_draws = torch.zeros(B, N, K).scatter(1, idx[..., None].expand(-1, -1, K), p0_same_draws)
        same = ~changed_before     # tokens whose input did not change since the last round (condition token apart)
        if prev_k is not None:
            seq_same = torch.cat([torch.ones(B, 1, dtype=torch.bool), same], 1).repeat(2, 1)     # (2B, S)
            row = dict(round=i, masked=r.n, unmask=r.count)
            for li in range(len(state.k)):
                for name, new, old in (("k", state.k[li], prev_k[li]), ("v", state.v[li], prev_v[li])):
                    d = (new - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)              # (2B, H, S)
                    row[f"{name}{li}_rel_change"] = d.mean(1)[seq_same].mean().item()
            m = mask & same
            dp = (full_p0 - prev_p0).abs().mean(-1)[m]
            row["p0_mean_abs_change"] = dp.mean().item()
            row["p0_mean_abs_change_same_draws"] = (same_draws - prev_p0).abs().mean(-1)[m].mean().item()
            conf_old = confidence(prev_p0).masked_fill(~mask, -1)
            conf_new = confidence(full_p0).masked_fill(~mask, -1)
            top_old = torch.sort(conf_old, dim=1, descending=True, stable=True).indices[:, :r.count]
            top_new = torch.sort(conf_new, dim=1, descending=True, stable=True).indices[:, :r.count]
            overlap = [len(set(a.tolist()) & set(b.tolist())) / max(1, r.count) for a, b in zip(top_old, top_new)]
            row["topk_overlap_old_vs_new"] = float(np.mean(overlap))
            rows.append(row)
        prev_k = [k.clone() for k in state.k]
        prev_v = [v.clone() for v in state.v]
        prev_p0 = full_p0
        mask_before = mask.clone()
        codes, mask = engine._unmask(p0, idx, r, codes, mask, opts, sample_index, torch.arange(K))
        changed_before = mask_before & ~mask
    out = QUALITY_DIR / f"reuse_drift_{args.preset}.json"
    out.write_text(json.dumps(dict(command="python bench/reuse.py " + " ".join(args.argv or []),
                                   date=time.strftime("%Y-%m-%d"), preset=args.preset, batch=B,
                                   sampling=opts.__dict__, rounds=rows), indent=1) + "\n")
    L = len(state.k)
    print("round  masked unmask  " + " ".join(f"k{li:<5d}" for li in range(L))
          + "  p0|d|   same draws  top-k kept")
    for row in rows:
        print(f"{row['round']:5d} {row['masked']:7d} {row['unmask']:6d}  "
              + " ".join(f"{row[f'k{li}_rel_change']:.4f}" for li in range(L))
              + f"  {row['p0_mean_abs_change']:.4f}  {row['p0_mean_abs_change_same_draws']:.4f}      "
              f"{row['topk_overlap_old_vs_new']:.3f}")
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------- plot

def cmd_plot(args) -> None:
    """Speed-up (from the latest `time` rows of the bundled model on this device) against accuracy and FD."""
    from PIL import Image, ImageDraw
    q = json.loads((QUALITY_DIR / "reuse_quality.json").read_text())
    rows = [json.loads(line) for line in (Path(args.out) / device_name("cpu") / "reuse.jsonl").read_text().splitlines()
            if line.strip()]
    speed = {}
    for r in rows:
        if r.get("preset") == "bundled":
            speed[r["config"]] = r["speedup_vs_exact"]      # later rows win
    pts = [(speed[x["config"]], x["accuracy"] * 100, x["fd"], x["config"]) for x in q["results"] if x["config"] in speed]
    W, H, pad = 900, 420, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xmax = max(p[0] for p in pts) * 1.15
    for panel, (col, label) in enumerate(((1, "classifier accuracy (%)"), (2, "FD (lower is better)"))):
        x0 = pad + panel * (W // 2)
        x1, y0, y1 = x0 + W // 2 - 2 * pad, pad, H - pad
        vals = [p[col] for p in pts]
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.1 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1)
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, y0 - 30), f"{label} vs speed-up over the exact engine", fill="black")
        d.text((x0, y1 + 8), f"1.0x .. {xmax:.1f}x", fill="black")
        d.text((x0 - 50, y0), f"{hi:.1f}", fill="black")
        d.text((x0 - 50, y1 - 10), f"{lo:.1f}", fill="black")
        for s, *v, name in pts:
            px = x0 + (s - 1) / (xmax - 1) * (x1 - x0) if xmax > 1 else x0
            py = y1 - (v[col - 1] - lo) / (hi - lo) * (y1 - y0)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill="red" if name == "exact" else "blue")
            d.text((px + 6, py - 6), name, fill="black")
    out = QUALITY_DIR / "reuse_frontier.png"
    img.save(out)
    print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["time", "quality", "drift", "plot"])
    ap.add_argument("--preset", default="bundled", help=f"bundled (the default model), {sorted(PRESETS)} or a released "
                                                         "preset (BiGR-L, ...) on random weights")
    ap.add_argument("--configs", nargs="*", help=f"reuse configs (default: {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="quality: samples per config")
    ap.add_argument("--fd-ref", type=int, default=2000, help="quality: test images of the FD reference set")
    ap.add_argument("--work", default=str(ROOT / "runs" / "reuse"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    {"time": cmd_time, "quality": cmd_quality, "drift": cmd_drift, "plot": cmd_plot}[args.command](args)


if __name__ == "__main__":
    main()
