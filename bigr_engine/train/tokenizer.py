"""Training the B-AE tokenizer with the release's recipe, sized for small images.

Loss: L1 reconstruction (+ a perceptual term when a feature network is given) + a hinge patch-GAN
whose weight is set adaptively from the gradient norms at the decoder's last layer, switched on late
(`disc_start`). Bits are Bernoulli draws with a straight-through gradient.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bigr_engine.models.tokenizer import BinaryAutoencoder
from bigr_engine.models.config import BAEConfig
from bigr_engine.train.state import JsonlLog, load_state, lr_at, rng_state, save_state, set_rng_state


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided 4x4 convs, BatchNorm, LeakyReLU; one logit per patch."""

    def __init__(self, in_ch: int = 3, ndf: int = 32, layers: int = 2):
        super().__init__()
        mods = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = ndf
        for i in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods += [nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


@dataclass
class TokenizerRecipe:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    disc_start: int = 2500
    disc_weight_max: float = 1.0
    code_entropy_weight: float = 0.0
    log_every: int = 50
    save_every: int = 500
    seed: int = 0


def adaptive_gan_weight(rec_loss, g_loss, last_layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach() * max_weight


def train_tokenizer(images: torch.Tensor, cfg: BAEConfig, recipe: TokenizerRecipe, out: Path,
                    feature_net: nn.Module | None = None, progress: bool = True) -> BinaryAutoencoder:
    """images (n,3,S,S) in [0,1]. Writes out/state.pt (resumable) and returns the trained tokenizer."""
    out = Path(out)
    torch.manual_seed(recipe.seed)
    bae = BinaryAutoencoder(cfg).train()
    disc = PatchDiscriminator(cfg.in_channels).train()
    opt = torch.optim.Adam(bae.parameters(), lr=recipe.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=recipe.lr, betas=(0.5, 0.9))
    start = 0
    state_path = out / "state.pt"
    if state_path.exists():
        st = load_state(state_path, "bae-train")
        bae.load_state_dict(st["model"]), disc.load_state_dict(st["disc"])
        opt.load_state_dict(st["opt"]), opt_d.load_state_dict(st["opt_d"])
        set_rng_state(st["rng"])
        start = st["step"]
    log = JsonlLog(out / "log.jsonl")
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="train-tokenizer", disable=not progress)
    last = bae.generator.blocks[-1].weight
    for step in bar:
        gen.manual_seed(recipe.seed * 1_000_003 + step)   # batch order is a function of the step: resumes exactly
        x = images[torch.randint(len(images), (recipe.batch_size,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe.lr, recipe.warmup, recipe.steps)
        recon, probs = bae.reconstruct(x)
        rec = (recon - x).abs().mean()
        if feature_net is not None:
            rec = rec + F.mse_loss(feature_net(recon), feature_net(x))
        loss = rec
        gan_on = step >= recipe.disc_start
        if gan_on:
            g_loss = -disc(recon).mean()
            loss = loss + adaptive_gan_weight(rec, g_loss, last, recipe.disc_weight_max) * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d_loss = torch.zeros(())
        if gan_on:  # hinge loss for the discriminator
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            bit_use = probs.detach().gt(0.5).float().mean((0, 2, 3))
            log.write(step, l1=rec.item(), d_loss=d_loss.item(), bits_on_min=bit_use.min().item(), bits_on_max=bit_use.max().item())
            bar.set_postfix(l1=f"{rec.item():.4f}")
        if (step + 1) % recipe.save_every == 0 or step == recipe.steps - 1:
            save_state(state_path, {"kind": "bae-train", "step": step + 1, "model": bae.state_dict(), "disc": disc.state_dict(),
                                    "opt": opt.state_dict(), "opt_d": opt_d.state_dict(), "rng": rng_state(),
                                    "config": cfg.to_dict(), "recipe": asdict(recipe)})
    return bae.eval()
