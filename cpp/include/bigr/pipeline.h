// bigr-engine's C++ API: class-conditional and text-to-image generation with a BiGR model, no Python at run time.
//
//   bigr::Pipeline p = bigr::Pipeline::load("model_dir");        // written by `bigr export cpp --out model_dir`
//   bigr::GenerateOptions o;  o.seed = 7;                        // unset options take the model's defaults
//   at::Tensor codes = p.generate({0, 1, 2}, o);                 // (3, N, K) uint8, equal to Python's engine
//   at::Tensor rgb = p.decode(codes);                            // (3, H, W, 3) uint8
//
// A text model (`bigr export cpp --text`; info().kind == "text") takes prompts instead of classes, encoded in C++ by
// the exported BERT text encoder (MiniLM; ASCII prompts only), or text conditions from any encoder: the embeddings
// and their mask (generate_text), or the packed condition tensor (generate(tensor)).
//   at::Tensor codes = p.generate(std::vector<std::string>{"a red sneaker", "a bag"}, o);
//
// Samples are keyed by (seed, sample index), so image i does not depend on the rest of its batch, the thread or the
// process, and equals what `bigr generate --seed S` (or `model.generate(..., seed=S)`) gives in float32.
// A loaded Pipeline holds no mutable state: concurrent calls from several threads on one Pipeline are safe.
// Every error is a bigr::Error whose message is the one the Python package gives for the same input.
//
// Link: find_package(bigr) with CMAKE_PREFIX_PATH from `python -c "import bigr_engine; print(bigr_engine.cmake_prefix_path)"`,
// then target_link_libraries(app PRIVATE bigr::bigr).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace bigr {

// Bad input, a missing or corrupt model directory, an unusable device: the message names the problem and the fix.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Sampling options; an unset one takes the model's default (`Pipeline::defaults()`), as in Python's
// `model.generate`. Names and meanings are Python's SamplingOptions'.
struct GenerateOptions {
  std::optional<double> cfg;                  // classifier-free guidance scale (1: no guidance)
  std::optional<int64_t> iters;               // unmasking iterations, 1..N
  std::optional<int64_t> steps;               // transcoder (Bernoulli diffusion) steps, 1..T
  std::optional<double> gumbel;               // Gumbel noise on the unmasking confidence
  std::optional<std::string> cfg_schedule;    // "constant" | "linear"
  std::optional<std::string> gumbel_schedule; // "constant" | "down" | "up"
  std::optional<double> temperature;          // of the transcoder's logits
  std::optional<bool> deterministic;          // token bits are p0 > 0.5 (the transcoder still samples)
  std::optional<bool> greedy;                 // every draw is its mode, no Gumbel noise
  std::optional<int64_t> seed;                // 0..2^63-1
  std::vector<int64_t> sample_index;          // per image; empty: 0..B-1 (its position in the batch)
  // The matmul precision under autocast (probabilities stay float32), as Python's `model.generate(dtype=...)`:
  // "auto" (unset: bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
  std::optional<std::string> dtype;
};

// The resolved options (every field set): the model's defaults with a GenerateOptions on top, checked.
struct SamplingOptions {
  double cfg = 2.5;
  int64_t iters = 20;
  int64_t steps = 100;
  double gumbel = 0.0;
  std::string cfg_schedule = "constant";
  std::string gumbel_schedule = "constant";
  double temperature = 1.0;
  bool deterministic = false;
  bool greedy = false;
  int64_t seed = 0;
};

// What a loaded model is.
struct ModelInfo {
  std::string kind = "class"; // "class" (class-conditional) or "text" (text-to-image: takes text conditions)
  int64_t num_tokens = 0;     // N tokens per image (a G x G grid)
  int64_t bits = 0;           // K bits per token
  int64_t num_classes = 0;    // classes 0..C-1; C is the null class (a text model: the classes of its training data)
  int64_t text_tokens = 0;    // a text model's L text positions (prompts left-padded to L tokens); 0 for a class model
  int64_t text_dim = 0;       // the width of its text encoder's embeddings; 0 for a class model
  std::string text_encoder;   // the encoder a text model was trained with, as exported ("minilm"); empty: not given
  bool encodes_prompts = false;   // the directory has a text encoder that runs in C++ (prompts, tokenize, encode_text)
  int64_t image_size = 0;     // decoded images are image_size x image_size (0: no tokenizer in the directory)
  int64_t channels = 0;       // of decoded images
  std::vector<std::string> class_names;   // empty when the model has none
  SamplingOptions defaults;   // the model's own sampling settings
};

// A text model's prompts as token ids (Pipeline::tokenize): (B, L) int64 and their mask (B, L) bool (true for a real
// token; padding on the left), as the Python text encoder's Hugging Face tokenizer gives them.
struct TextTokens {
  at::Tensor ids, mask;
};

// A text model's prompts encoded (Pipeline::encode_text): the embeddings (B, L, text_dim) float32 (zero on padding)
// and their mask (B, L) bool, as Python's models.text.TextEncoder returns them; generate_text's input.
struct TextEmbeddings {
  at::Tensor embeddings, mask;
};

struct LoadOptions {
  std::string device = "cpu";   // "cpu", "cuda", "cuda:1"
  bool verify = true;           // check every file's sha256 against the manifest (a corrupt file is refused)
};

class Pipeline {
 public:
  // Load a directory written by `bigr export cpp`. Throws bigr::Error naming what is missing or corrupt.
  static Pipeline load(const std::string& dir, const LoadOptions& options = {});

  const ModelInfo& info() const;
  const SamplingOptions& defaults() const { return info().defaults; }

  // The model's defaults with `options` on top, checked against the model (the checks of Python's
  // SamplingOptions.check, with its messages).
  SamplingOptions resolve(const GenerateOptions& options) const;

  // Class ids (0..C, C the null class) -> codes (B, N, K) uint8 on the pipeline's device. Class models only.
  at::Tensor generate(const std::vector<int64_t>& labels, const GenerateOptions& options = {}) const;
  // A class model: class names (as `info().class_names`). A text model: prompts (ASCII), encoded by the exported
  // text encoder (encode_text) -> codes, as Python's model.generate(prompts).
  at::Tensor generate(const std::vector<std::string>& names_or_prompts, const GenerateOptions& options = {}) const;
  // A class model: class ids (B,) int64, or class weights (B, C+1) floating point (a mixture over the label table).
  // A text model: condition tensors (B, L, 1 + text_dim) floating point, as Python's models.text.pack_condition
  // makes them (channel 0 the token mask: 1 for a real token, 0 for padding; channels 1.. the embeddings). -> codes.
  at::Tensor generate(const at::Tensor& labels, const GenerateOptions& options = {}) const;
  // A text model: the text encoder's embeddings (B, L, text_dim) floating point and their mask (B, L) (true for a
  // real token, false for padding; at least one per row) -> codes, as Python's model.generate(pack_condition(
  // embeddings, mask)). CFG's unconditional branch is the model's null text (its empty prompt's condition).
  at::Tensor generate_text(const at::Tensor& embeddings, const at::Tensor& mask,
                           const GenerateOptions& options = {}) const;

  // Codes (B, N, K) 0/1 -> images (B, H, W, channels) uint8 (clamped to [0, 1], scaled by 255, rounded half to
  // even: the bytes of Python's `bigr generate` PNGs). Needs a directory exported with a tokenizer.
  at::Tensor decode(const at::Tensor& codes) const;

  // Class names -> ids; an unknown name is an Error listing the model's classes.
  std::vector<int64_t> class_ids(const std::vector<std::string>& names) const;

  // A text model with its encoder (info().encodes_prompts): prompts -> token ids and mask (BERT WordPiece: lower-cased,
  // split on whitespace and punctuation, [CLS] tokens [SEP], truncated on the right and padded on the left to
  // text_tokens). A prompt with a non-ASCII byte is an Error: C++ implements BERT's ASCII normalisation only.
  TextTokens tokenize(const std::vector<std::string>& prompts) const;
  // Prompts -> the text encoder's embeddings and mask, on the pipeline's device (float32, whatever the dtype option).
  TextEmbeddings encode_text(const std::vector<std::string>& prompts) const;

  struct Impl;

 private:
  explicit Pipeline(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// The build: "bigr-engine <version>, torch <version>, CUDA kernels <yes|no> ..." (the ops library's build_info).
std::string build_info();

}  // namespace bigr
