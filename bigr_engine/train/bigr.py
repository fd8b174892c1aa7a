"""Training BiGR by masked modeling (paper sec. 3.2; release recipe).

Per sample: a mask ratio cos(pi/2 r), r ~ U(0,1), picks the tokens to hide (at least one); the class
is dropped to the null class with probability 0.1; the transformer sees the visible tokens; every
masked token trains the transcoder at `transcoder_repeat` random steps t with the weighted XOR loss.

Every random choice is keyed by (seed, global sample index, purpose) through `rng`, and the data order
by (seed, epoch), so a run resumed from a checkpoint, or split over several processes with the same
global batch, computes the same thing as one uninterrupted process. The loss is a mean over samples
of each sample's mean over its masked bits, so averaging gradients over ranks gives the global mean.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bigr_engine.errors import BigrError
from bigr_engine.io.distributed import process_rank
from bigr_engine.models.config import BiGRConfig
from bigr_engine.models.transcoder import flip_loss
from bigr_engine.ops import kernels as kernel_choice, rng
from bigr_engine.ops.kernels import Kernels
from bigr_engine.sampling import BiGR
from bigr_engine.train.state import Ema, JsonlLog, load_state, lr_at, save_state

class TextConditions:
    """A text model's training conditions, precomputed: the distinct captions' condition tensors `table` (U, L, 1 + dim)
    (models.text.pack_condition of the encoder's output), each sample's caption ids (n, slots) into it, and the empty
    prompt's condition `null` (L, 1 + dim), the null text of CFG. At each step a sample trains on one of its slots,
    drawn by the counter RNG from (seed, sample, step), so resumed and multi-process runs see the same captions."""

    def __init__(self, table: torch.Tensor, ids: torch.Tensor, null: torch.Tensor):
        if table.dim() != 3 or null.shape != table.shape[1:] or ids.dim() != 2:
            raise BigrError(f"text conditions: table (U, L, C), ids (n, slots) and null (L, C), got "
                            f"{tuple(table.shape)}, {tuple(ids.shape)}, {tuple(null.shape)}")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(table)):
            raise BigrError(f"caption ids must be in 0..{len(table) - 1}")
        self.table, self.ids, self.null = table.float(), ids.long(), null.float()

    def __len__(self) -> int:
        return len(self.ids)

    def pick(self, idx: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """The conditions (B, L, 1 + dim) of dataset samples idx at `step`."""
        u = rng.uniform(seed, idx, rng.stream(rng.TRAIN_CAPTION, step % 4096, step // 4096 % 4096), (1,))[:, 0]
        slot = (u * self.ids.shape[1]).long().clamp(max=self.ids.shape[1] - 1)
        return self.table[self.ids[idx, slot]]


@dataclass
class TrainRecipe:
    steps: int = 10000
    batch_size: int = 64          # global batch (over all ranks and accumulation steps)
    grad_accum: int = 1
    lr: float = 4e-4
    warmup: int = 500
    lr_schedule: str = "cosine"
    weight_decay: float = 0.02
    ema: float = 0.9999
    class_dropout: float = 0.1
    transcoder_repeat: int = 4
    grad_clip: float = 1.0
    log_every: int = 50
    save_every: int = 1000
    seed: int = 0
    # Run settings, not model settings: a run may resume with other values.
    ops: str = "engine"           # "engine": the fused attention (and transcoder ops) of the extension; "reference": plain PyTorch
    sample_every: int = 1000      # a grid of EMA samples every this many steps and at the end (needs a B-AE); 0 = off
    sample_per_class: int = 4     # grid: up to 8 classes spread over the range, this many samples of each
    sample_iters: int = 8         # few unmasking iterations and transcoder steps: a grid is a progress check, not a result
    sample_steps: int = 25
    sample_cfg: float = 2.0


def masked_modeling_loss(model: BiGR, codes: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor,
                         seed: int, step: int, class_dropout: float = 0.1, repeat: int = 1,
                         kernels: Kernels | None = None) -> torch.Tensor:
    """codes (B,N,K) 0/1, labels (B,), sample_index (B,) global ids -> per-sample loss (B,).
    kernels: the compiled kernels to use (see `kernels_for`; None: the plain-PyTorch path)."""
    kernels = kernels or kernel_choice.plain(codes.device)
    B, N, K = codes.shape
    cfg = model.cfg
    s = lambda kind: rng.stream(kind, step % 4096, step // 4096 % 4096)  # noqa: E731
    codes = codes.float()
    drop = rng.uniform(seed, sample_index, s(rng.TRAIN_CLASS_DROP), (1,))[:, 0] < class_dropout
    if cfg.is_text:   # prompt dropout: the empty prompt's condition
        labels = torch.where(drop[:, None, None], model.transformer.null_text.to(labels.dtype), labels)
    else:
        labels = torch.where(drop, torch.full_like(labels, cfg.null_class), labels)
    ratio = torch.cos(math.pi / 2 * rng.uniform(seed, sample_index, s(rng.TRAIN_MASK_RATIO), (1,))[:, 0])
    n_mask = (ratio * N).floor().clamp(1, N).long()
    order = rng.uniform(seed, sample_index, s(rng.TRAIN_MASK_ORDER), (N,)).argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N).contiguous())
    mask = rank < n_mask[:, None]

    z = model.transformer.conditions(codes, mask, labels, attn_fn=kernels.attention)   # (B,N,D)
    tables = model.schedule(codes.device)
    T = cfg.train_steps
    u_t = rng.uniform(seed, sample_index, s(rng.TRAIN_DIFF_STEP), (repeat, N))   # (B,R,N)
    t = (u_t * T).long().clamp(0, T - 1) + 1                           # uniform on 1..T
    x0 = codes[:, None].expand(B, repeat, N, K)
    p_t = tables["k_final"][t][..., None] * x0 + tables["b_final"][t][..., None]
    x_t = (rng.uniform(seed, sample_index, s(rng.TRAIN_DIFF_NOISE), (repeat, N, K)) < p_t).float()
    sel = mask[:, None].expand(B, repeat, N)
    logits = model.transcoder(x_t[sel], t[sel], z[:, None].expand(B, repeat, N, -1)[sel], kernels)
    per_bit = flip_loss(logits.float(), x0[sel], x_t[sel])               # (M,K)
    owner = torch.arange(B, device=codes.device)[:, None, None].expand(B, repeat, N)[sel]
    per_sample = torch.zeros(B, device=codes.device).index_add_(0, owner, per_bit.mean(-1))
    return per_sample / (n_mask.to(per_sample.dtype) * repeat)


OPS_CHOICES = ("engine", "reference")


def kernels_for(ops: str, device, dtype: torch.dtype, head_dim: int) -> tuple[Kernels, str | None]:
    """-> (kernels, note): for ops="engine" the compiled attention and transcoder-block kernels that run (and passed
    their self-test) on `device`, with a note naming those that fell back to plain PyTorch and why; for
    ops="reference" none."""
    if ops not in OPS_CHOICES:
        raise BigrError(f"ops must be one of {OPS_CHOICES}, got {ops!r}")
    k = kernel_choice.choose(device, dtype, head_dim, enabled=ops == "engine")
    if ops == "reference":
        return k, None
    refused = k.refused(("attention", "ln_modulate", "gated_residual"))
    return k, (f"--ops engine falls back to plain PyTorch for {'; '.join(refused)}" if refused else None)


def sample_classes(num_classes: int, most: int = 8) -> list[int]:
    """Up to `most` class ids spread evenly over 0..num_classes-1."""
    n = min(most, num_classes)
    return sorted({round(i * (num_classes - 1) / max(1, n - 1)) for i in range(n)})


def write_sample_grid(ema: BiGR, bae, recipe: TrainRecipe, step: int, out: Path,
                      text: TextConditions | None = None):
    """Generate a class-conditional grid (one row per class) with the EMA weights, decode it with the B-AE and
    write out/samples/step_XXXXXXX.png atomically; -> (path, grid uint8). A text model's rows are up to 8 captions
    spread evenly over its caption table (`text`; rows sample_classes(len(table)) of it). The same seed and sample
    indices at every step, so the grids of one run show how the same samples evolve. The global torch RNG is left
    as it was."""
    from bigr_engine.io.files import write_files_atomic
    from bigr_engine.io.images import make_grid, png_bytes, to_uint8
    cfg = ema.cfg
    if text is not None:
        rows = torch.tensor(sample_classes(len(text.table)))
        labels = text.table[rows].to(ema.device).repeat_interleave(recipe.sample_per_class, dim=0)
    else:
        classes = sample_classes(cfg.num_classes)
        labels = torch.tensor(classes, device=ema.device).repeat_interleave(recipe.sample_per_class)
    rng_state = torch.get_rng_state()
    was_training = ema.training
    try:
        ema.eval()
        codes = ema.generate(labels, cfg=recipe.sample_cfg, iters=min(recipe.sample_iters, cfg.num_tokens),
                             steps=min(recipe.sample_steps, cfg.train_steps), seed=recipe.seed,
                             sample_index=torch.arange(len(labels)))
        with torch.inference_mode():
            images = to_uint8(bae.decode(codes.to(bae_device(bae))))
    finally:
        torch.set_rng_state(rng_state)
        ema.train(was_training)
    path = out / "samples" / f"step_{step:07d}.png"
    grid = make_grid(images, recipe.sample_per_class)
    write_files_atomic({path: png_bytes(grid)})
    return path, grid


def bae_device(bae) -> torch.device:
    return next(bae.parameters()).device


def param_groups(model: BiGR, weight_decay: float):
    """AdamW decay on matrices of the transformer only: none on 1-D params, biases, or the transcoder."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") or name.startswith("transcoder.") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_indices(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of step `step`: a slice of a per-epoch permutation keyed by (seed, epoch)."""
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch:(pos + 1) * batch]


def train(codes: torch.Tensor, labels, cfg: BiGRConfig, recipe: TrainRecipe, out: Path,
          device="cpu", progress: bool = True, on_save=None, bae=None, init: dict | None = None) -> tuple[BiGR, BiGR]:
    """codes (n,N,K) uint8 (or a memmap-backed tensor), labels (n,) class ids, or for a text model (cfg.text_dim > 0)
    TextConditions. Writes out/state.pt, out/log.jsonl and, with a B-AE `bae` (the tokenizer of the codes), sample
    grids out/samples/step_XXXXXXX.png; returns (model, ema). init: a state dict whose tensors of matching name and
    shape start a new run (a warm start, e.g. a text model from a class model's blocks and transcoder)."""
    out = Path(out)
    rank, world, _ = process_rank()
    if recipe.ops not in OPS_CHOICES:
        raise BigrError(f"ops must be one of {OPS_CHOICES}, got {recipe.ops!r}")
    if recipe.sample_every < 0 or recipe.sample_per_class < 1:
        raise BigrError(f"sample_every must be >= 0 (0 = no grids) and sample_per_class >= 1, "
                        f"got {recipe.sample_every} and {recipe.sample_per_class}")
    if recipe.batch_size % (world * recipe.grad_accum):
        raise ValueError(f"batch size {recipe.batch_size} must divide by ranks x accumulation = {world * recipe.grad_accum}")
    if len(codes) < recipe.batch_size:
        raise ValueError(f"the dataset has {len(codes)} samples, fewer than one batch of {recipe.batch_size}")
    micro = recipe.batch_size // (world * recipe.grad_accum)
    if cfg.is_text != isinstance(labels, TextConditions):
        raise BigrError("a text model (text_dim > 0) trains on TextConditions, a class model on class ids")
    torch.manual_seed(recipe.seed)
    model = BiGR(cfg).to(device).train()
    if init is not None:
        own = model.state_dict()
        fits = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fits, strict=False)
    if cfg.is_text:
        with torch.no_grad():
            model.transformer.null_text.copy_(labels.null)
    if bae is not None:
        from bigr_engine.io.checkpoints import check_pair
        check_pair(model, bae)  # before any work: a tokenizer of another code would only fail at the first grid
    on_cuda = torch.device(device).type == "cuda"
    kernels, ops_note = kernels_for(recipe.ops, device, torch.bfloat16 if on_cuda else torch.float32, cfg.head_dim)
    if ops_note and rank == 0:
        warnings.warn(ops_note, RuntimeWarning, stacklevel=2)
    ema = Ema(model, recipe.ema)
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.95))
    start = 0
    state_path = out / "state.pt"
    if state_path.exists():
        st = load_state(state_path, "bigr-train")
        if st["config"] != cfg.to_dict():
            from bigr_engine.errors import CheckpointError
            raise CheckpointError(f"{state_path} was trained with another model config; pass another --out or the same options")
        model.load_state_dict(st["model"])
        ema.model.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
    log = JsonlLog(out / "log.jsonl") if rank == 0 else None
    sampling = recipe.sample_every > 0 and bae is not None
    if log:
        notes = [ops_note] if ops_note else []
        if log.tb is None:
            notes.append("no TensorBoard log: the tensorboard package is not installed (pip install tensorboard)")
        if recipe.sample_every > 0 and bae is None:
            notes.append("no sample grids: no B-AE was given to decode the codes (pass --bae, the tokenizer of the data)")
        # One record per (re)start: a resumed run may use other run settings than the steps before it.
        log.write(start, event="start", ops=recipe.ops, attention="fused" if kernels.uses("attention") else "reference",
                  transcoder_ops=kernels.fused_blocks, tensorboard=log.tb is not None,
                  sample_grids=sampling, notes=notes)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="train", disable=not progress or rank)
    for step in bar:
        lr = lr_at(step, recipe.lr, recipe.warmup, recipe.steps, recipe.lr_schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(len(codes), step, recipe.batch_size, recipe.seed)
        total = 0.0
        for a in range(recipe.grad_accum):
            lo = (a * world + rank) * micro
            mine = idx[lo:lo + micro]
            with autocast:
                lab = labels.pick(mine, recipe.seed, step) if cfg.is_text else labels[mine]
                loss = masked_modeling_loss(model, codes[mine].to(device), lab.to(device),
                                            (step * recipe.batch_size + lo + torch.arange(micro)).to(device),
                                            recipe.seed, step, recipe.class_dropout, recipe.transcoder_repeat,
                                            kernels).mean()
            (loss / recipe.grad_accum).backward()
            total += loss.item() / recipe.grad_accum
        if world > 1:
            average_gradients(model, world)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip) if recipe.grad_clip else torch.zeros(())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        if log and (step % recipe.log_every == 0 or step == recipe.steps - 1):
            log.write(step, loss=total, lr=lr, grad_norm=float(gnorm))
            bar.set_postfix(loss=f"{total:.4f}")
        if rank == 0 and ((step + 1) % recipe.save_every == 0 or step == recipe.steps - 1):
            save_state(state_path, {"kind": "bigr-train", "step": step + 1, "model": model.state_dict(),
                                    "ema": ema.model.state_dict(), "opt": opt.state_dict(),
                                    "config": cfg.to_dict(), "recipe": asdict(recipe)})
            if on_save:
                on_save(step + 1, ema.model)
        if rank == 0 and sampling and ((step + 1) % recipe.sample_every == 0 or step == recipe.steps - 1):
            path, grid = write_sample_grid(ema.model, bae, recipe, step + 1, out,
                                           labels if cfg.is_text else None)
            log.write(step + 1, event="samples", path=str(path.relative_to(out)))
            log.image("samples", grid, step + 1)
    return model.eval(), ema.model


def average_gradients(model: torch.nn.Module, world: int):
    """All-reduce the gradients (one flat buffer): each rank's loss is a mean of per-sample means over the
    same number of samples, so the average over ranks is the global-batch gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def init_distributed():
    """Join a torchrun job (gloo on CPU, nccl on GPU) when its environment variables are set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
