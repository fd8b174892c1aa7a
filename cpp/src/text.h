// A text model's prompt encoder in C++: BERT's WordPiece tokenizer and the BERT encoder (MiniLM, the bundled text
// model's), as Python's models.text.TextEncoder runs them through Hugging Face's fast tokenizer and BertModel. The
// tokenizer's settings and vocabulary, and the encoder's weights, come from the model directory (`bigr export cpp`
// writes them from the Python encoder: manifest.json "text_encoder"."bert", vocab.txt, text_encoder.safetensors).
//
// ASCII prompts only: BERT's normaliser also strips accents after a Unicode NFD decomposition, splits CJK characters
// and knows Unicode's punctuation and whitespace classes, none of which is implemented here, so a prompt with a byte
// >= 0x80 is refused with an Error rather than tokenized differently from Python.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "files.h"
#include "network.h"

namespace bigr::detail {

// The fast tokenizer's pipeline for one sequence: the special tokens ([CLS], [SEP], ...) matched in the raw text;
// BertNormalizer (control characters dropped, whitespace to ' ', lower-casing); BertPreTokenizer (split on whitespace,
// every punctuation character a word of its own); WordPiece (greedy longest match first, "##" continuations, a word
// that cannot be covered, or longer than max_input_chars_per_word, is [UNK]); then truncation on the right to L - 2
// tokens, [CLS] tokens [SEP], and padding on the left with [PAD] to L.
class WordPiece {
 public:
  WordPiece(const files::Json& spec, const std::string& vocab_path);
  // The token ids of one prompt, without [CLS]/[SEP]; `index` names the prompt in errors.
  std::vector<int64_t> tokens(const std::string& prompt, size_t index) const;
  // prompts -> ids (B, L) int64 and mask (B, L) bool (true for a real token), on the CPU.
  std::pair<at::Tensor, at::Tensor> encode(const std::vector<std::string>& prompts, int64_t L) const;

 private:
  void word_pieces(const std::string& word, std::vector<int64_t>& out) const;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::pair<std::string, int64_t>> special_;   // matched in the raw text, before normalisation
  std::string prefix_;
  size_t max_chars_ = 100;
  bool lowercase_ = true;
  int64_t cls_ = 0, sep_ = 0, pad_ = 0, unk_ = 0;
};

// BertModel's forward (absolute positions, token type 0, the SDPA attention with Hugging Face's additive mask, GELU),
// float32, on the pipeline's device: each op the one transformers' modeling_bert.py calls, in its order.
class BertEncoder {
 public:
  BertEncoder(const files::Json& spec, const Weights& w, const std::string& file, at::Device device);
  // ids (B, L) int64 and mask (B, L) bool -> the last hidden state (B, L, dim) float32 with the padding rows zero
  // (TextEncoder.__call__).
  at::Tensor operator()(const at::Tensor& ids, const at::Tensor& mask) const;
  int64_t dim() const { return word_.size(1); }

 private:
  struct Layer {
    Linear q, k, v, attn_out, intermediate, out;
    at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  };
  at::Tensor word_, position_, token_type_, ln_w_, ln_b_;
  std::vector<Layer> layers_;
  int64_t heads_ = 1;
  double eps_ = 1e-12;
};

}  // namespace bigr::detail
