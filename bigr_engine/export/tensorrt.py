"""TensorRT: engines built from an ONNX export (`bigr export tensorrt`), and `TensorRTPipeline`, which runs the
engine's loop over them on a GPU.

Building and running need the `tensorrt` Python package and an NVIDIA GPU; this module imports without either and
says which is missing when used. The loop (`device_loop`) is the engine's, with the transformer's and the
transcoder's calls replaced by the exported graphs: uniforms from the counter RNG (the compiled CUDA `rng_uniform`
where it runs), the posterior arithmetic inside the step graph, and the unmasking by the engine's own
`unmask_topk` (or its plain twin). Tests run `device_loop` on the CPU over the export's eager modules
(export.graphs), so only the engine calls themselves are left to `tools/gpu_check.sh`.

Layout of ENGINES/: manifest.json (the ONNX export's, copied), engines.json (TensorRT version, GPU, batch buckets,
each engine's optimization profiles), {graph}.engine per graph, timing.cache (reused by later builds). A text model's
export adds text_encoder.engine (float32, fixed groups of TEXT_GROUP prompts, as OnnxPipeline runs it) and keeps the
tokenizer files and the null condition beside the engines (copied; the host tokenizes as OnnxPipeline does).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from bigr_engine.errors import BigrError
from bigr_engine.export.manifest import MANIFEST, read_manifest
from bigr_engine.export.pipeline import DECODE_GROUP, TEXT_GROUP, HostLoop, TextTokenizer, encode_prompts
from bigr_engine.sampling.options import rounds_for

ENGINES = "engines.json"


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BigrError("TensorRT engines need the `tensorrt` Python package and an NVIDIA GPU: pip install tensorrt "
                        "on the GPU machine (it is not installed here)") from None
    import torch
    if not torch.cuda.is_available():
        raise BigrError("TensorRT engines need an NVIDIA GPU, and torch sees none here")
    return trt


# ---------------------------------------------------------------------------------------------- profiles

def profiles(graph: str, io: dict, buckets: list[int], num_tokens: int) -> list[dict]:
    """The optimization profiles of a graph, one per batch bucket (images per call): {input: (min, opt, max)} with
    the dynamic axes filled in. The conditions graph sees up to 2 rows per image (CFG), the step graph up to
    num_tokens tokens per image and 2 branches; the decoder runs fixed groups of DECODE_GROUP, a text export's
    text_encoder fixed groups of TEXT_GROUP prompts."""
    out = []
    fixed = {"decoder": DECODE_GROUP, "text_encoder": TEXT_GROUP}
    for b in ([fixed[graph]] if graph in fixed else buckets):
        sizes = {"batch": (1, 2 * b if graph == "conditions" else b, 2 * b if graph == "conditions" else b),
                 "tokens": (1, max(1, b * num_tokens // 2), b * num_tokens), "branches": (1, 2, 2)}
        prof = {}
        for name, meta in io["inputs"].items():
            lo, opt, hi = ([], [], [])
            for d in meta["shape"]:
                if isinstance(d, str):
                    a, o, h = sizes[d]
                else:
                    a = o = h = d
                lo.append(a)
                opt.append(o)
                hi.append(h)
            prof[name] = (tuple(lo), tuple(opt), tuple(hi))
        out.append(prof)
    return out


def build_engines(onnx_dir, out, buckets: list[int], progress: bool = True) -> list[Path]:
    """Build {graph}.engine for every graph of an ONNX export into `out` (strongly typed: the export's dtypes)."""
    manifest = read_manifest(onnx_dir)
    trt = _tensorrt()
    import torch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = out / "timing.cache"
    written, info = [], {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "buckets": buckets,
                         "dtype": manifest["dtype"], "engines": {}}
    from tqdm.auto import tqdm
    for name, g in tqdm(manifest["graphs"].items(), desc="build engines", unit="engine", disable=not progress):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(Path(onnx_dir) / g["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BigrError(f"TensorRT could not parse {g['file']}: {errors}")
        config = builder.create_builder_config()
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profs = profiles(name, g, buckets, manifest["model"]["num_tokens"])
        for prof in profs:
            p = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in prof.items():
                p.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(p)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BigrError(f"TensorRT failed to build the {name} engine (its log above says why)")
        path = out / f"{name}.engine"
        path.write_bytes(bytes(plan))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        info["engines"][name] = {"file": path.name, "profiles": [{k: [list(s) for s in v] for k, v in p.items()}
                                                                  for p in profs]}
        written.append(path)
    write_host_files(manifest, onnx_dir, out)
    (out / ENGINES).write_text(json.dumps(info, indent=1))
    return written


def write_host_files(manifest: dict, onnx_dir, out) -> None:
    """What TensorRTPipeline reads beside the engines: the export's manifest without its graph files (the engines
    stand in for them) and, for a text export, the tokenizer files and the null condition, copied (still listed with
    their sha256)."""
    import copy
    import shutil
    manifest = copy.deepcopy(manifest)
    out = Path(out)
    for g in manifest["graphs"].values():
        g.pop("files", None)
    if manifest.get("text"):
        for f in manifest["text"]["files"]:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(onnx_dir) / f, out / f)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------------------------- the loop (torch)

def device_loop(conditions, step, loop: HostLoop, weights, opts, sample_index, kernels=None):
    """The engine's loop over graph callables on torch tensors (any device): conditions(codes, mask, weights) -> cz
    (G*B, N, Hd) and step(x, cz, step, cfg, temperature, coeffs, u) -> (p0, x_next), as export.graphs defines them.
    weights (B, C+1) float32 (a text export: the condition tensors (B, L, 1 + text_dim)), sample_index (B,) int64 on
    the device -> codes (B, N, K) uint8. CFG's unconditional rows are loop.null_rows."""
    import torch

    from bigr_engine.models.transcoder import inference_steps
    from bigr_engine.ops import compiled, rng
    from bigr_engine.sampling import engine
    from bigr_engine.sampling.reuse import first_true
    if opts.order != "entropy":
        raise BigrError(f"exported pipelines sample in entropy order only, got order={opts.order!r}")
    dev = weights.device
    B, N, K = weights.shape[0], loop.num_tokens, loop.bits
    use_cfg = opts.cfg != 1.0
    G = 2 if use_cfg else 1
    if use_cfg:
        weights = torch.cat([weights, torch.from_numpy(loop.null_rows(B)).to(dev, weights.dtype)])
    steps = inference_steps(loop.train_steps, opts.steps)
    coeffs = torch.from_numpy(loop.step_coefficients(steps)).to(dev)
    step_t = torch.tensor(steps, device=dev, dtype=torch.int64)[:, None]
    temperature = torch.tensor([opts.temperature], device=dev, dtype=torch.float32)
    uniform = rng.uniform_at if kernels is None else kernels.uniform_at
    use_topk = kernels is not None and kernels.uses("unmask_topk")
    codes = torch.zeros(B, N, K, device=dev, dtype=torch.uint8)
    mask = torch.ones(B, N, device=dev, dtype=torch.bool)
    bit = torch.arange(K, device=dev)
    for r in rounds_for(opts, N):
        idx = first_true(mask, r.n)
        cz = conditions(codes.repeat(G, 1, 1).float(), mask.repeat(G, 1), weights).view(G, B, N, -1)
        cz = torch.gather(cz, 2, idx[None, :, :, None].expand(G, -1, -1, cz.shape[-1])).reshape(G, B * r.n, -1)
        counters = idx[..., None] * K + bit
        x = engine._initial_bits(opts, sample_index, rng.stream(rng.TRANSCODER_INIT, r.iteration), counters,
                                 kernels).float().view(B * r.n, K)
        cfg = torch.tensor([r.cfg], device=dev, dtype=torch.float32)
        for j in range(len(steps)):
            if opts.greedy:
                u = torch.full((B * r.n, K), 0.5, device=dev)
            else:
                u = uniform(opts.seed, sample_index, rng.stream(rng.TRANSCODER_STEP, r.iteration, j),
                            counters).view(B * r.n, K)
            p0, x = step(x, cz, step_t[j], cfg, temperature, coeffs[j], u)
        p0 = p0.view(B, r.n, K)
        if use_topk:
            k = torch.full((B,), r.count, device=dev, dtype=torch.int64)
            compiled.unmask_topk(p0, idx, k, codes, mask, r.gumbel, opts.seed, sample_index,
                                 rng.stream(rng.GUMBEL, r.iteration), rng.stream(rng.TOKEN_BITS, r.iteration),
                                 opts.deterministic or opts.greedy)
        else:
            codes, mask = engine._unmask(p0, idx, r, codes, mask, opts, sample_index, bit)
    return codes


# ---------------------------------------------------------------------------------------------- running engines

_TORCH_DTYPES = {"FLOAT": "float32", "BF16": "bfloat16", "HALF": "float16", "INT64": "int64", "INT32": "int32",
                 "BOOL": "bool"}


class _Engine:
    """One deserialized engine with an execution context per optimization profile. A call picks the smallest
    profile that holds its shapes; calls on one context are serialized by its lock (contexts are not re-entrant)."""

    def __init__(self, trt, runtime, path: Path, profile_shapes: list[dict]):
        import torch
        self.torch = torch
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BigrError(f"TensorRT could not load {path} (built by another TensorRT version or for another GPU?); "
                            f"build it again with `bigr export tensorrt`")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtypes = {n: getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name]) for n in self.names}
        self.profiles = profile_shapes
        self.contexts = []
        for i in range(len(profile_shapes)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, torch.cuda.current_stream().cuda_stream)
            self.contexts.append((ctx, threading.Lock()))

    def _profile(self, shapes: dict) -> int:
        for i, prof in enumerate(self.profiles):
            if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], prof[n][0], prof[n][2])) for n in shapes):
                return i
        raise BigrError(f"no optimization profile of this engine holds the shapes {shapes}; build the engines with "
                        f"a larger --batch-buckets entry")

    def __call__(self, *args):
        torch = self.torch
        feeds = {n: a.to(self.dtypes[n]).contiguous() for n, a in zip(self.inputs, args)}
        ctx, lock = self.contexts[self._profile({n: tuple(t.shape) for n, t in feeds.items()})]
        stream = torch.cuda.current_stream()
        with lock:
            for n, t in feeds.items():
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, t.data_ptr())
            outs = {}
            for n in self.outputs:
                outs[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.dtypes[n], device="cuda")
                ctx.set_tensor_address(n, outs[n].data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BigrError("TensorRT failed to run an engine (its log above says why)")
        result = [outs[n] for n in self.outputs]
        return result[0] if len(result) == 1 else result


class TensorRTPipeline(HostLoop):
    """TensorRT engines of `bigr export tensorrt` with the engine's loop on the GPU (numpy in and out, as
    OnnxPipeline): generate(labels, sample_index=None, **options) -> (B, N, K) uint8; decode(codes) -> images. A text
    export's generate takes prompts or condition tensors, as OnnxPipeline's."""

    def __init__(self, path):
        trt = _tensorrt()
        import torch

        from bigr_engine.ops import kernels as kernel_choice
        self.path = Path(path)
        if not (self.path / ENGINES).is_file():
            raise BigrError(f"{self.path} has no {ENGINES}: build engines with `bigr export tensorrt --onnx DIR --out "
                            f"{self.path}`")
        info = json.loads((self.path / ENGINES).read_text())
        super().__init__(read_manifest(self.path, verify=False), self.path)
        if self.is_text and "text_encoder" not in info["engines"]:
            raise BigrError(f"{self.path} is a text model's export without a text_encoder engine: build the engines "
                            f"again with `bigr export tensorrt`")
        self.text_tokenizer = TextTokenizer(self.path, self.text) if self.is_text else None
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for name, e in info["engines"].items():
            shapes = [{k: [tuple(s) for s in v] for k, v in p.items()} for p in e["profiles"]]
            self.engines[name] = _Engine(trt, runtime, self.path / e["file"], shapes)
        self.device = torch.device("cuda")
        self.kernels = kernel_choice.choose(self.device)

    def encode_text(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (embeddings (B, L, dim) float32, mask (B, L) bool), OnnxPipeline.encode_text on the engine."""
        import torch
        if not self.is_text:
            raise BigrError(f"{self.path} holds a class-conditional model's engines, which take class ids or names, "
                            f"not prompts; build engines from a text model's export for prompts")
        engine = self.engines["text_encoder"]

        def run(ids, mask):
            with torch.no_grad():
                h = engine(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
            return h.float().cpu().numpy()
        return encode_prompts(self.text_tokenizer, run, prompts)

    def generate(self, labels, sample_index=None, progress: bool = False, **options) -> np.ndarray:
        import torch
        weights = torch.from_numpy(self.conditions_for(labels, self.encode_text)).to(self.device)
        opts = self.sampling_options(**options)
        si = np.arange(weights.shape[0]) if sample_index is None else np.asarray(sample_index).reshape(-1)
        if si.shape[0] != weights.shape[0]:
            raise BigrError(f"sample_index needs one entry per label: {si.shape[0]} for {weights.shape[0]} labels")
        si = torch.from_numpy(si.astype(np.int64)).to(self.device)
        with torch.no_grad():
            codes = device_loop(self.engines["conditions"], self.engines["transcoder_step"], self, weights, opts, si,
                                self.kernels)
        return codes.cpu().numpy()

    def decode(self, codes) -> np.ndarray:
        import torch
        if "decoder" not in self.engines:
            raise BigrError(f"{self.path} has no decoder engine: export with a tokenizer, then build again")
        codes = torch.as_tensor(np.asarray(codes), device=self.device).float()
        out = []
        for a in range(0, len(codes), DECODE_GROUP):
            chunk = codes[a:a + DECODE_GROUP]
            n = len(chunk)
            if n < DECODE_GROUP:
                chunk = torch.cat([chunk, chunk[:1].expand(DECODE_GROUP - n, *chunk.shape[1:])])
            out.append(self.engines["decoder"](chunk)[:n].float().cpu().numpy())
        return np.concatenate(out)
