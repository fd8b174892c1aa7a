"""CUDA graphs of whole generations: captured once per batch bucket and what changes the graph, then replayed.

Valid because the engine's loop never syncs with the host and draws its randomness from counter hashes rather
than a generator state. The cache is keyed by the batch bucket, the label layout, the options that are baked
into the captured kernels (every sampling option but the seed: the seeds are a per-row device tensor, a static input
like the labels, so a new seed replays the same graph), the matmul dtype, the kernel choice and the device. It is bounded (least recently used first out) and
dropped whole when the model's weights move or change storage (`model.half()`, `load_state_dict` into new
tensors), since a graph replays the memory it was captured on. It lives beside the model (a weak mapping), not
on it, and a lock makes concurrent first calls capture once.
"""
from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import astuple, replace

import torch

CAPACITY = 8   # graphs kept per model


def batch_bucket(B: int) -> int:
    """Graphs are captured for batch sizes 1, 2, 4, ..., so a service with varying batches keeps a handful."""
    return 1 << max(0, math.ceil(math.log2(B)))


def weights_signature(model: torch.nn.Module) -> tuple:
    """Where and as what the weights live: a graph captured on other storage must not be replayed."""
    return tuple((p.data_ptr(), p.dtype, p.device, tuple(p.shape)) for p in model.parameters())


class _GraphedCall:
    """One whole generation captured for a fixed batch bucket; inputs are copied into static buffers and the codes
    copied out."""

    def __init__(self, fn, labels: torch.Tensor, null: torch.Tensor, sample_index: torch.Tensor, seeds: torch.Tensor):
        self.labels, self.null, self.sample_index = labels.clone(), null.clone(), sample_index.clone()
        self.seeds = seeds.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up off the capture: cuBLAS handles, cached tables, allocator
            for _ in range(2):
                fn(self.labels, self.null, self.sample_index, self.seeds)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.labels, self.null, self.sample_index, self.seeds)
        self.lock = threading.Lock()           # one replay at a time: the static buffers are shared

    def __call__(self, labels, null, sample_index, seeds):
        with self.lock:
            self.labels.copy_(labels)
            self.null.copy_(null)
            self.sample_index.copy_(sample_index)
            self.seeds.copy_(seeds)
            self.graph.replay()
            return self.out.clone()


class GraphCache:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.graphs: OrderedDict = OrderedDict()
        self.signature: tuple | None = None
        self.lock = threading.Lock()

    def get(self, key, signature: tuple, make) -> _GraphedCall:
        with self.lock:
            if signature != self.signature:    # weights moved or changed storage: every graph is stale
                self.graphs.clear()
                self.signature = signature
            if key in self.graphs:
                self.graphs.move_to_end(key)
                return self.graphs[key]
            call = make()
            self.graphs[key] = call
            while len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
            return call


_caches: "weakref.WeakKeyDictionary[torch.nn.Module, GraphCache]" = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def cache_for(model: torch.nn.Module) -> GraphCache:
    with _caches_lock:
        if model not in _caches:
            _caches[model] = GraphCache()
        return _caches[model]


def graph_key(Bp: int, labels: torch.Tensor, opts, plan) -> tuple:
    """What a captured graph depends on; not the seed, which is an input (per-row seeds)."""
    return (Bp, labels.dtype, tuple(labels.shape[1:]), astuple(replace(opts, seed=0)), plan.dtype, plan.kernels,
            plan.reuse, str(labels.device))


def replay(model, plan, labels, null, sample_index, seeds, opts, fn) -> torch.Tensor:
    """fn(labels, null, sample_index, seeds) -> codes, run through the model's graph for this batch bucket and
    options; seeds (B,) int64 on the device."""
    B = labels.shape[0]
    Bp = batch_bucket(B)
    pad = Bp - B
    if pad:   # padding rows repeat row 0; they are computed and dropped (rows never interact)
        labels = torch.cat([labels, labels[:1].expand(pad, *labels.shape[1:])])
        null = torch.cat([null, null[:1].expand(pad, *null.shape[1:])])
        sample_index = torch.cat([sample_index, sample_index[:1].expand(pad)])
        seeds = torch.cat([seeds, seeds[:1].expand(pad)])
    call = cache_for(model).get(graph_key(Bp, labels, opts, plan), weights_signature(model),
                                lambda: _GraphedCall(fn, labels, null, sample_index, seeds))
    return call(labels, null, sample_index, seeds)[:B]
