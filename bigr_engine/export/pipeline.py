"""Generation over an exported directory (`bigr export onnx`) with ONNX Runtime: numpy in and out, no torch.

The loop is the engine's (`sampling.engine`): per round, the conditions graph on [conditional; unconditional] rows,
the transcoder-step graph on the still-masked tokens only, then the unmasking on the host (`export.host`). Every
random number comes from the counter RNG keyed by (seed, sample index), so the pipeline gives the engine's samples.
`OnnxPipeline` is stateless after loading: ONNX Runtime sessions take concurrent `run` calls, so one pipeline serves
concurrent generate calls.

A text model's export (manifest "text") takes prompts: the host tokenizes them with the `tokenizers` library from the
exported tokenizer.json (left padding to the model's L tokens, as models.text.TextEncoder does), runs
text_encoder.onnx, packs the condition tensor (B, L, 1 + text_dim) and samples with the exported empty prompt's
condition (null_condition.npy) as CFG's unconditional branch. Condition tensors can be passed instead of prompts.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bigr_engine.errors import BigrError
from bigr_engine.export import host
from bigr_engine.export.manifest import read_manifest
from bigr_engine.sampling.options import SamplingOptions, as_options, rounds_for

DECODE_GROUP = 16   # io.images.DECODE_GROUP: decode in fixed-size groups, so pixels do not depend on the batch
TEXT_GROUP = 8      # prompts per text-encoder call, in fixed-size groups: a prompt's embedding is batch-independent


class TextTokenizer:
    """prompts -> (input_ids (B, L) int64, attention_mask (B, L) int64): a text export's tokenizer.json read by the
    `tokenizers` library with what the Hugging Face fast tokenizer of models.text.TextEncoder sets on it per call
    (truncation to L tokens on the right, padding to L on the left with the manifest's pad token); the export checks
    the two agree (onnx_export._write_text_files). Offline: nothing is downloaded."""

    def __init__(self, root, text: dict):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BigrError("a text export tokenizes prompts with the `tokenizers` package: pip install tokenizers "
                            "(or pass condition tensors instead of prompts)") from None
        import threading
        path = Path(root) / text["tokenizer"]
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on a bad file
            raise BigrError(f"{path} is not a tokenizer the `tokenizers` library reads ({str(e).splitlines()[0]}); "
                            f"export again with `bigr export onnx`") from None
        L = int(text["tokens"])
        tok.enable_truncation(max_length=L, stride=0, strategy="longest_first", direction=text["truncation_side"])
        tok.enable_padding(direction=text["padding_side"], pad_id=int(text["pad_id"]),
                           pad_type_id=int(text["pad_type_id"]), pad_token=text["pad_token"], length=L)
        self.tokenizer, self.tokens = tok, L
        self._lock = threading.Lock()

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            enc = self.tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(enc), self.tokens)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(enc), self.tokens)
        return ids, mask


def check_prompts(prompts) -> list[str]:
    """A prompt or a list of prompts -> the list, or a clear error (models.text.TextEncoder's message)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise BigrError("no prompts given: pass a list of one or more strings")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise BigrError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return prompts


def encode_prompts(tokenizer: TextTokenizer, run, prompts) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (embeddings (B, L, dim) float32, mask (B, L) bool) with run(ids, mask) -> embeddings, the text
    encoder graph, called on fixed groups of TEXT_GROUP prompts (a short group is filled with copies of its first)."""
    ids, attn = tokenizer(check_prompts(prompts))
    out = []
    for a in range(0, len(ids), TEXT_GROUP):
        i, m = ids[a:a + TEXT_GROUP], attn[a:a + TEXT_GROUP]
        n = len(i)
        if n < TEXT_GROUP:
            i = np.concatenate([i, np.repeat(i[:1], TEXT_GROUP - n, 0)])
            m = np.concatenate([m, np.repeat(m[:1], TEXT_GROUP - n, 0)])
        out.append(np.asarray(run(i, m))[:n])
    return np.concatenate(out).astype(np.float32), attn.astype(bool)


class HostLoop:
    """The sampling loop over two callables that run the graphs (ONNX Runtime sessions here, TensorRT engines in
    export.tensorrt): conditions(codes, mask, class_weights or text_condition) -> cz and step(x, cz, step, cfg,
    temperature, coeffs, u) -> (p0, x_next), all numpy. root: the export folder (a text export's null condition is
    read from it)."""

    def __init__(self, manifest: dict, root=None):
        self.manifest = manifest
        cfg = manifest["model"]
        self.num_tokens, self.bits, self.num_classes = cfg["num_tokens"], cfg["bits"], cfg["num_classes"]
        self.train_steps = cfg["train_steps"]
        self.tables = {k: np.asarray(v, dtype=np.float32) for k, v in manifest["schedule"].items()}
        self.default_sampling = as_options(manifest["sampling"])
        self.class_names = manifest.get("class_names")
        self.text = manifest.get("text")
        self.text_tokens, self.text_dim = cfg.get("text_tokens", 0), cfg.get("text_dim", 0)
        self.null_text = None   # a text export's empty prompt's condition (L, 1 + text_dim) float32
        if self.is_text and root is not None:
            self.null_text = np.load(Path(root) / self.text["null_condition"], allow_pickle=False).astype(np.float32)
            if self.null_text.shape != (self.text_tokens, 1 + self.text_dim):
                raise BigrError(f"{Path(root) / self.text['null_condition']} holds a {self.null_text.shape} array, "
                                f"the model needs ({self.text_tokens}, {1 + self.text_dim}); export again")
        # what models.classes and options.resolve_options read off a model
        self.cfg = SimpleNamespace(num_tokens=self.num_tokens, num_classes=self.num_classes,
                                   train_steps=self.train_steps, is_text=self.is_text)

    @property
    def is_text(self) -> bool:
        """A text-to-image export: it takes prompts (or condition tensors), not class ids."""
        return bool(self.text)

    # ---- input checks (the messages of models.bigr.BiGRNetwork.check_labels) --------------------------------------
    def class_weights(self, labels) -> np.ndarray:
        """Class ids, names, or (B, C+1) weights -> (B, C+1) float32 weights (ids as one-hot rows)."""
        from bigr_engine.models.classes import class_ids
        C1 = self.num_classes + 1
        if isinstance(labels, str):
            labels = [labels]
        if isinstance(labels, (list, tuple)) and any(isinstance(x, str) for x in labels):
            try:
                labels = class_ids(labels, self)
            except BigrError as e:   # a prompt, most likely
                raise BigrError(f"{e} (this export is class-conditional: it takes class ids or names; prompts need a "
                                f"text model's export, e.g. `bigr export onnx --text`)") from None
        arr = np.asarray(labels)
        if arr.dtype.kind == "f":
            if arr.ndim != 2 or arr.shape[1] != C1:
                raise BigrError(f"class weights must be (B, {C1}), got {tuple(arr.shape)}")
            return np.ascontiguousarray(arr, dtype=np.float32)
        if arr.dtype.kind not in "iub":
            raise BigrError(f"labels must be class ids, class names or (B, {C1}) weights, got {arr.dtype} values")
        ids = arr.astype(np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids > self.num_classes)]
        if bad.size:
            raise BigrError(f"class id {int(bad[0])} is out of range: this model has classes 0..{self.num_classes - 1} "
                            f"(and {self.num_classes} for the null class)")
        return np.eye(C1, dtype=np.float32)[ids]

    def text_condition(self, labels, encode=None) -> np.ndarray:
        """Prompts (encoded by encode(prompts) -> (embeddings, mask)) or condition tensors (B, L, 1 + text_dim) ->
        (B, L, 1 + text_dim) float32 (models.bigr.BiGRNetwork._check_text's messages)."""
        L, C = self.text_tokens, 1 + self.text_dim
        if isinstance(labels, str) or (isinstance(labels, (list, tuple)) and
                                       (not labels or any(isinstance(p, str) for p in labels))):
            prompts = check_prompts(labels)
            if encode is None:
                raise BigrError("this pipeline cannot encode prompts; pass condition tensors")
            return host.pack_condition(*encode(prompts))
        arr = np.asarray(labels)
        if arr.dtype.kind in "iub" and arr.ndim <= 1:
            raise BigrError(f"this export is a text-to-image model: pass prompts (strings) or condition tensors "
                            f"(B, {L}, {C}), not class ids (those need a class model's export)")
        if arr.dtype.kind != "f" or arr.ndim != 3 or arr.shape[1:] != (L, C) or arr.shape[0] == 0:
            raise BigrError(f"a text export takes prompts (strings) or condition tensors (B, {L}, {C}) from "
                            f"models.text.pack_condition, got {arr.dtype} values of shape {tuple(arr.shape)}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def conditions_for(self, labels, encode=None) -> np.ndarray:
        """What the conditions graph takes for `labels`: class weights (B, C+1), or a text export's conditions."""
        return self.text_condition(labels, encode) if self.is_text else self.class_weights(labels)

    def null_rows(self, batch: int) -> np.ndarray:
        """The unconditional branch of CFG: the null class's one-hot rows, or the empty prompt's condition."""
        if self.is_text:
            if self.null_text is None:
                raise BigrError("this text pipeline has no null condition (null_condition.npy); load it from its folder")
            return np.ascontiguousarray(np.broadcast_to(self.null_text, (batch, *self.null_text.shape)))
        null = np.zeros((batch, self.num_classes + 1), np.float32)
        null[:, self.num_classes] = 1
        return null

    def sampling_options(self, **overrides) -> SamplingOptions:
        from bigr_engine.sampling.options import resolve_options
        return resolve_options(self, **overrides)

    def step_coefficients(self, steps: list[int]) -> np.ndarray:
        """(S, 4) float32: TranscoderStep's posterior coefficients for each step of `steps` (the last step's are
        unused: it outputs p0)."""
        return np.stack([host.posterior_coefficients(self.tables, t, steps[j + 1]) if j + 1 < len(steps)
                         else np.array([1, 0, 1, 1], np.float32) for j, t in enumerate(steps)])

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self, conditions, step, weights: np.ndarray, opts: SamplingOptions, sample_index: np.ndarray,
            progress: bool = False) -> np.ndarray:
        if opts.order != "entropy":
            raise BigrError(f"exported pipelines sample in entropy order only, got order={opts.order!r}")
        B, N, K = weights.shape[0], self.num_tokens, self.bits
        use_cfg = opts.cfg != 1.0
        G = 2 if use_cfg else 1
        if use_cfg:
            weights = np.concatenate([weights, self.null_rows(B)])
        steps = host.inference_steps(self.train_steps, opts.steps)
        coeffs = self.step_coefficients(steps)
        temperature = np.array([opts.temperature], np.float32)
        codes = np.zeros((B, N, K), np.uint8)
        mask = np.ones((B, N), bool)
        bit = np.arange(K)
        rounds = rounds_for(opts, N)
        if progress:
            from tqdm.auto import tqdm
            rounds = tqdm(rounds, desc="generate", unit="iter", leave=False)
        for r in rounds:
            idx = host.masked_positions(mask, r.n)                                       # (B, n)
            cz = conditions(np.tile(codes, (G, 1, 1)).astype(np.float32), np.tile(mask, (G, 1)), weights)
            cz = cz.reshape(G, B, N, -1)
            cz = np.take_along_axis(cz, np.broadcast_to(idx[None, :, :, None], (G, B, r.n, 1)), 2)
            cz = np.ascontiguousarray(cz.reshape(G, B * r.n, -1))
            counters = idx[..., None] * K + bit                                          # (B, n, K)
            if opts.greedy:
                x = np.zeros((B * r.n, K), np.float32)
            else:
                u0 = host.uniform_at(opts.seed, sample_index, host.stream(host.TRANSCODER_INIT, r.iteration), counters)
                x = (u0 < np.float32(0.5)).astype(np.float32).reshape(B * r.n, K)
            cfg = np.array([r.cfg], np.float32)
            for j, t in enumerate(steps):
                if opts.greedy:
                    u = np.full((B * r.n, K), 0.5, np.float32)
                else:
                    u = host.uniform_at(opts.seed, sample_index, host.stream(host.TRANSCODER_STEP, r.iteration, j),
                                        counters).reshape(B * r.n, K)
                p0, x = step(x, cz, np.array([t], np.int64), cfg, temperature, coeffs[j], u)
            host.unmask(p0.reshape(B, r.n, K), idx, r.count, r.gumbel, codes, mask, opts.seed, sample_index,
                        r.iteration, opts.deterministic or opts.greedy)
        return codes


class OnnxPipeline(HostLoop):
    """An exported BiGR (and its tokenizer, when exported) on ONNX Runtime.

        pipe = OnnxPipeline("exported/")                    # providers default to ONNX Runtime's available ones
        codes = pipe.generate(["Sneaker", 3], seed=0)       # (B, N, K) uint8, the engine's codes
        images = pipe.decode(codes)                         # (B, 3, H, W) float32 in [0, 1]

    A text model's export takes prompts (or condition tensors (B, L, 1 + text_dim)) in place of classes:
    pipe.generate(["a dark sneaker", "a bag"], seed=0); pipe.encode_text(prompts) gives the text encoder's output.

    `generate` takes the options of `BiGR.generate` (cfg, iters, steps, gumbel, cfg_schedule, gumbel_schedule,
    temperature, deterministic, greedy, seed, sample_index); left out, they take the exported model's defaults."""

    def __init__(self, path, providers=None, threads: int | None = None, verify: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BigrError("OnnxPipeline needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu)") from None
        self.path = Path(path)
        super().__init__(read_manifest(self.path, verify=verify), self.path)
        if self.manifest["dtype"] != "float32" and not _has_gpu_provider(providers or ort.get_available_providers()):
            raise BigrError(f"{self.path} is a {self.manifest['dtype']} export, which ONNX Runtime's CPU provider "
                            f"cannot run (no bf16 Gemm); export with --dtype float32 for CPU, or use a GPU provider")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        self.providers = list(providers) if providers else ort.get_available_providers()
        self.sessions = {}
        for name, g in self.manifest["graphs"].items():
            try:
                self.sessions[name] = ort.InferenceSession(str(self.path / g["file"]), so, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
                raise BigrError(f"ONNX Runtime could not load {self.path / g['file']}: {str(e).splitlines()[0]}; "
                                f"export again with `bigr export onnx`") from None
        self.text_tokenizer = TextTokenizer(self.path, self.text) if self.is_text else None

    @property
    def has_tokenizer(self) -> bool:
        return "decoder" in self.sessions

    def _conditions(self, codes, mask, weights):
        name = "text_condition" if self.is_text else "class_weights"
        return self.sessions["conditions"].run(None, {"codes": codes, "mask": mask, name: weights})[0]

    def encode_text(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (embeddings (B, L, dim) float32, zeroed at the padding; mask (B, L) bool), as
        models.text.TextEncoder gives them: tokenized on the host, text_encoder.onnx in fixed groups of TEXT_GROUP."""
        if not self.is_text:
            raise BigrError(f"{self.path} is a class-conditional export, which takes class ids or names, not prompts; "
                            f"export a text model (e.g. `bigr export onnx --text`) for prompts")
        session = self.sessions["text_encoder"]
        return encode_prompts(self.text_tokenizer, lambda i, m: session.run(None, {"input_ids": i,
                                                                                 "attention_mask": m})[0], prompts)

    def _step(self, x, cz, step, cfg, temperature, coeffs, u):
        return self.sessions["transcoder_step"].run(None, {"x": x, "cz": cz, "step": step, "cfg": cfg,
                                                           "temperature": temperature, "coeffs": coeffs, "u": u})

    def generate(self, labels, sample_index=None, progress: bool = False, **options) -> np.ndarray:
        """labels: class ids, names or (B, C+1) weights; for a text export prompts or (B, L, 1 + text_dim)
        condition tensors -> codes (B, N, K) uint8."""
        weights = self.conditions_for(labels, self.encode_text)
        opts = self.sampling_options(**options)
        if sample_index is None:
            sample_index = np.arange(weights.shape[0])
        sample_index = np.asarray(sample_index, dtype=np.int64).reshape(-1)
        if sample_index.shape[0] != weights.shape[0]:
            raise BigrError(f"sample_index needs one entry per label: {sample_index.shape[0]} for "
                            f"{weights.shape[0]} labels")
        return self.run(self._conditions, self._step, weights, opts, sample_index, progress)

    def _tokenizer(self, what: str):
        if not self.has_tokenizer:
            raise BigrError(f"{self.path} was exported without a tokenizer, so it cannot {what}; export with "
                            f"--bae (or the bundled default) to include decoder.onnx and encoder.onnx")
        return self.manifest["tokenizer"]

    def decode(self, codes) -> np.ndarray:
        """(B, N, K) 0/1 codes -> (B, 3, H, W) float32 images in [0, 1] (as BinaryAutoencoder.decode)."""
        tok = self._tokenizer("decode")
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != (tok["grid"] ** 2, tok["bits"]):
            raise BigrError(f"codes must be (B, {tok['grid'] ** 2}, {tok['bits']}) for this tokenizer, got "
                            f"shape {tuple(codes.shape)}")
        out = []
        for a in range(0, len(codes), DECODE_GROUP):
            chunk = codes[a:a + DECODE_GROUP].astype(np.float32)
            n = len(chunk)
            if n < DECODE_GROUP:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], DECODE_GROUP - n, 0)])
            out.append(self.sessions["decoder"].run(None, {"codes": chunk})[0][:n])
        s = tok["img_size"]
        return np.concatenate(out) if out else np.zeros((0, 3, s, s), np.float32)

    def encode(self, images, deterministic: bool = True) -> np.ndarray:
        """(B, 3, H, W) float images in [0, 1] -> (B, N, K) uint8 codes (p > 0.5)."""
        tok = self._tokenizer("encode")
        images = np.asarray(images, dtype=np.float32)
        s = tok["img_size"]
        if images.ndim != 4 or images.shape[1:] != (tok["in_channels"], s, s):
            raise BigrError(f"images must be (B, {tok['in_channels']}, {s}, {s}), got shape {tuple(images.shape)}")
        if not deterministic:
            raise BigrError("OnnxPipeline.encode gives the deterministic codes (p > 0.5) only")
        return (self.sessions["encoder"].run(None, {"images": images})[0] > 0.5).astype(np.uint8)


def _has_gpu_provider(providers) -> bool:
    return any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") or
               (isinstance(p, tuple) and p[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
               for p in providers)
