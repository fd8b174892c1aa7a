// The engine's generation loop (bigr_engine/sampling/engine.py with reuse off, the compiled-op path): the schedule of
// rounds (sampling/options.py rounds_for), the masked-only transcoder loop with the fused posterior step, and the
// top-k unmasking. Every draw is keyed by (seed, sample index, stream, counter) in the ops, so codes equal Python's.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "bigr/pipeline.h"
#include "network.h"

namespace bigr::detail {

struct Round {
  int64_t iteration;   // keys the round's random streams
  int64_t n;           // masked tokens before the round (all of them go through the transcoder)
  int64_t count;       // tokens unmasked by the round
  double cfg, gumbel;
};

std::vector<Round> rounds_for(const SamplingOptions& o, int64_t num_tokens);
std::vector<int64_t> inference_steps(int64_t T, int64_t S);

// labels (B,) int64 or (B, C+1) float, or a text model's conditions (B, L, 1 + text_dim) float32, on the network's
// device; sample_index (B,) int64 -> codes (B, N, K) uint8.
at::Tensor generate(const Network& net, const at::Tensor& labels, const at::Tensor& sample_index,
                    const SamplingOptions& o);

}  // namespace bigr::detail
