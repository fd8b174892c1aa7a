"""Generation over an exported directory (`bigr export onnx`) with ONNX Runtime: numpy in and out, no torch.

The loop is the engine's (`sampling.engine`): per round, the conditions graph on [conditional; unconditional] rows,
the transcoder-step graph on the still-masked tokens only, then the unmasking on the host (`export.host`). Every
random number comes from the counter RNG keyed by (seed, sample index), so the pipeline gives the engine's samples.
`OnnxPipeline` is stateless after loading: ONNX Runtime sessions take concurrent `run` calls, so one pipeline serves
concurrent generate calls.
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


class HostLoop:
    """The sampling loop over two callables that run the graphs (ONNX Runtime sessions here, TensorRT engines in
    export.tensorrt): conditions(codes, mask, class_weights) -> cz and step(x, cz, step, cfg, temperature, coeffs, u)
    -> (p0, x_next), all numpy."""

    def __init__(self, manifest: dict):
        self.manifest = manifest
        cfg = manifest["model"]
        self.num_tokens, self.bits, self.num_classes = cfg["num_tokens"], cfg["bits"], cfg["num_classes"]
        self.train_steps = cfg["train_steps"]
        self.tables = {k: np.asarray(v, dtype=np.float32) for k, v in manifest["schedule"].items()}
        self.default_sampling = as_options(manifest["sampling"])
        self.class_names = manifest.get("class_names")
        # what models.classes and options.resolve_options read off a model
        self.cfg = SimpleNamespace(num_tokens=self.num_tokens, num_classes=self.num_classes,
                                   train_steps=self.train_steps)

    # ---- input checks (the messages of models.bigr.BiGRNetwork.check_labels) --------------------------------------
    def class_weights(self, labels) -> np.ndarray:
        """Class ids, names, or (B, C+1) weights -> (B, C+1) float32 weights (ids as one-hot rows)."""
        from bigr_engine.models.classes import class_ids
        C1 = self.num_classes + 1
        if isinstance(labels, str):
            labels = [labels]
        if isinstance(labels, (list, tuple)) and any(isinstance(x, str) for x in labels):
            labels = class_ids(labels, self)
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
            null = np.zeros_like(weights)
            null[:, self.num_classes] = 1
            weights = np.concatenate([weights, null])
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

    `generate` takes the options of `BiGR.generate` (cfg, iters, steps, gumbel, cfg_schedule, gumbel_schedule,
    temperature, deterministic, greedy, seed, sample_index); left out, they take the exported model's defaults."""

    def __init__(self, path, providers=None, threads: int | None = None, verify: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BigrError("OnnxPipeline needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu)") from None
        self.path = Path(path)
        super().__init__(read_manifest(self.path, verify=verify))
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

    @property
    def has_tokenizer(self) -> bool:
        return "decoder" in self.sessions

    def _conditions(self, codes, mask, weights):
        return self.sessions["conditions"].run(None, {"codes": codes, "mask": mask, "class_weights": weights})[0]

    def _step(self, x, cz, step, cfg, temperature, coeffs, u):
        return self.sessions["transcoder_step"].run(None, {"x": x, "cz": cz, "step": step, "cfg": cfg,
                                                           "temperature": temperature, "coeffs": coeffs, "u": u})

    def generate(self, labels, sample_index=None, progress: bool = False, **options) -> np.ndarray:
        weights = self.class_weights(labels)
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
