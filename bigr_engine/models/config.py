"""Model hyper-parameters, the released presets, and inference of a config from a state dict.

The BiGR reference spec (sections 1, 6 and 7: model sizes, tokenizer, checkpoint layout) is the source of every
number here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from bigr_engine.errors import CheckpointError, BigrError


def _known_fields(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise CheckpointError(f"unknown {what} {sorted(unknown)}; valid names are {sorted(names)} "
                              f"(was the file written by another bigr-engine version?)")
    return d


def ffn_hidden(dim: int) -> int:
    """SwiGLU hidden size of the release: int(2 * 4D / 3) rounded up to a multiple of 256."""
    hidden = int(2 * 4 * dim / 3)
    return 256 * math.ceil(hidden / 256)


@dataclass
class BiGRConfig:
    dim: int = 1024                # D, transformer width
    n_layer: int = 24
    n_head: int = 16               # head size D / n_head (64 in every released model)
    bits: int = 16                 # K, bits per token
    num_tokens: int = 256          # N = G * G
    num_classes: int = 1000        # the label table has num_classes + 1 rows; the last is the null class
    ffn_dim: int = 0               # 0: derived from dim as the release does
    use_adaln: bool = True         # shared adaLN (every released model); False: plain pre-norm blocks
    transcoder_blocks: int = 3
    transcoder_dim: int = 1024     # Hd
    train_steps: int = 256         # T of the Bernoulli diffusion
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # Text conditioning (the paper's appendix B): text_dim > 0 replaces the class token by up to text_tokens
    # embeddings from a text encoder of that width, projected by an MLP and placed before the image tokens.
    text_dim: int = 0              # 0: class-conditional
    text_tokens: int = 0           # L, the text positions (left-padded prompts)

    def __post_init__(self):
        if not self.ffn_dim:
            self.ffn_dim = ffn_hidden(self.dim)
        if (self.text_dim > 0) != (self.text_tokens > 0):
            raise BigrError(f"a text model needs both text_dim and text_tokens (got {self.text_dim} and "
                            f"{self.text_tokens}); a class model neither")
        if self.text_dim and self.use_adaln:
            raise BigrError("a text model conditions through its text tokens only (the paper's appendix B): pass "
                            "use_adaln=False")
        if self.dim % self.n_head:
            raise BigrError(f"width {self.dim} is not divisible by {self.n_head} heads; pass n_head so that dim/n_head is an integer")
        if (self.dim // self.n_head) % 4:
            raise BigrError(f"head size {self.dim // self.n_head} is not a multiple of 4, which 2D RoPE needs; pass another n_head")
        g = math.isqrt(self.num_tokens)
        if g * g != self.num_tokens:
            raise BigrError(f"{self.num_tokens} tokens is not a square grid; BiGR needs N = G*G tokens (e.g. 256 for 16x16)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> int:
        return math.isqrt(self.num_tokens)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def is_text(self) -> bool:
        return self.text_dim > 0

    @property
    def cond_tokens(self) -> int:
        """Positions before the image tokens: the class token, or the text tokens."""
        return self.text_tokens if self.is_text else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BiGRConfig":
        return cls(**_known_fields(cls, d, "BiGR config keys"))


# Released BiGR transformers (spec section 1). Bits and classes come from the checkpoint.
BIGR_PRESETS = {
    "BiGR-L": dict(dim=1024, n_layer=24, n_head=16, transcoder_blocks=3, transcoder_dim=1024, num_tokens=256),
    "BiGR-XL": dict(dim=1280, n_layer=36, n_head=20, transcoder_blocks=6, transcoder_dim=1280, num_tokens=256),
    "BiGR-XXL": dict(dim=1536, n_layer=48, n_head=24, transcoder_blocks=8, transcoder_dim=1536, num_tokens=256),
    "BiGR-L-512": dict(dim=1024, n_layer=24, n_head=16, transcoder_blocks=6, transcoder_dim=1280, num_tokens=1024),
}


def bigr_preset(name: str, **overrides) -> BiGRConfig:
    """A released preset by name; a `-dK` suffix (e.g. "BiGR-L-d24") sets the bit width."""
    m = re.fullmatch(r"(.*?)(?:-d(\d+))?", name)
    base, bits = m.group(1), m.group(2)
    if base not in BIGR_PRESETS:
        raise BigrError(f"unknown BiGR preset {name!r}; choose one of {sorted(BIGR_PRESETS)} (optionally with -d16/-d20/-d24/-d32)")
    kw = dict(BIGR_PRESETS[base])
    if bits:
        kw["bits"] = int(bits)
    kw.update(overrides)
    return BiGRConfig(**kw)


@dataclass
class BAEConfig:
    """The binary autoencoder; names follow the release's hyper-parameters."""
    nf: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    res_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [16])
    emb_dim: int = 256
    codebook_size: int = 24        # K, bits per token
    img_size: int = 256
    norm_first: bool = True
    in_channels: int = 3

    @property
    def bits(self) -> int:
        return self.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.img_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2

    def __post_init__(self):
        self.ch_mult = list(self.ch_mult)
        self.attn_resolutions = list(self.attn_resolutions)
        if self.img_size % self.downsample:
            raise BigrError(f"img_size {self.img_size} is not divisible by the tokenizer's downsampling factor {self.downsample}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BAEConfig":
        return cls(**_known_fields(cls, d, "B-AE options"))


def bae_preset(name: str, **overrides) -> BAEConfig:
    """"d24" / "d32-512" style names: released tokenizers (spec section 6) at 256 or 512 px."""
    m = re.fullmatch(r"(?:B-AE-)?d(\d+)(?:-(256|512))?", name)
    if not m:
        raise BigrError(f"unknown B-AE preset {name!r}; use d16, d20, d24 or d32, optionally with -256 or -512 (e.g. d32-512)")
    kw = dict(codebook_size=int(m.group(1)), img_size=int(m.group(2) or 256))
    kw.update(overrides)
    return BAEConfig(**kw)


def _count(prefix_re: str, keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(prefix_re, k))}
    return max(found) + 1 if found else 0


def infer_bigr_config(sd: dict, n_head: int | None = None, head_dim: int = 64) -> BiGRConfig:
    """Read the architecture off a state dict (keys as in spec section 7)."""
    try:
        dim, bits = sd["tok_embeddings.weight"].shape
        num_tokens = sd["diffusion_pos_embed_learned"].shape[1]
        rows = sd["cls_embedding.embedding_table.weight"].shape[0]
        hd = sd["denoise_mlp.c_embedder.weight"].shape[0]
        ffn = sd["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a BiGR state dict: key {e.args[0]!r} is missing; pass a BiGR checkpoint (bigr_*.pt or one written by `bigr convert`)") from None
    sched = sd.get("diffusion_processor.scheduler.beta")
    return BiGRConfig(
        dim=dim, bits=bits, num_tokens=num_tokens, num_classes=rows - 1,
        n_layer=_count(r"layers\.(\d+)\.", sd), n_head=n_head or dim // head_dim, ffn_dim=ffn,
        use_adaln="adaLN.1.weight" in sd,
        transcoder_blocks=_count(r"denoise_mlp\.blocks\.(\d+)\.", sd), transcoder_dim=hd,
        train_steps=(sched.shape[0] - 1) if sched is not None else 256,
    )


def infer_bae_config(sd: dict, **overrides) -> BAEConfig:
    """Read a B-AE's architecture off its state dict (keys without the 'ae.' prefix).

    The block list is the release's construction order, so the resolution levels, residual blocks
    per level and the levels with attention can all be read back. The image size is not stored in
    the weights: attention in the release sits at resolution 16, so a model with per-level attention
    at level L was built for 16 * 2**L pixels; pass img_size to override.
    """
    try:
        nf = sd["encoder.blocks.0.weight"].shape[0]
        bits, emb_dim = sd["quantize.embed.weight"].shape
    except KeyError as e:
        raise CheckpointError(f"not a B-AE state dict: key {e.args[0]!r} is missing; pass a B-AE checkpoint (binaryae_*.th or one written by `bigr convert`)") from None
    n_blocks = _count(r"encoder\.blocks\.(\d+)\.", sd)
    levels, level, res_per_level, attn_levels = [], [], [], set()
    for i in range(1, n_blocks - 5):          # skip conv_in and the 5-block tail (Res, Attn, Res, GN, conv)
        p = f"encoder.blocks.{i}."
        if p + "conv1.weight" in sd:
            level.append(sd[p + "conv1.weight"].shape[0])
        elif p + "q.weight" in sd:
            attn_levels.add(len(levels))
        elif p + "conv.weight" in sd:          # downsample: ends a level
            levels.append(level)
            level = []
    levels.append(level)
    ch_mult = [lv[-1] // nf for lv in levels]
    res_per_level = {len(lv) for lv in levels}
    if len(res_per_level) != 1:
        raise CheckpointError("B-AE state dict has a different number of residual blocks per resolution; not a release-layout tokenizer")
    kw = dict(nf=nf, ch_mult=ch_mult, res_blocks=res_per_level.pop(), emb_dim=emb_dim, codebook_size=bits,
              norm_first=sd["generator.blocks.0.weight"].dim() == 1)
    img_size = overrides.pop("img_size", None)
    if img_size is None:
        img_size = 16 * 2 ** min(attn_levels) if attn_levels else 256
    kw["img_size"] = img_size
    kw["attn_resolutions"] = sorted({img_size >> lv for lv in attn_levels}, reverse=True)
    kw.update(overrides)
    return BAEConfig(**kw)
