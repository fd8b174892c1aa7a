// The prompt encoder: BERT's WordPiece tokenizer and BertModel in ATen; see text.h.
#include "text.h"

#include <fstream>
#include <limits>

namespace bigr::detail {
namespace {

// ASCII classes as the tokenizers library (Rust) sees them. Whitespace first maps to ' ' (\t \n \r and ' '); the
// other C0 controls and DEL are dropped (\v and \f too: Rust counts them as whitespace, but the normaliser's control
// filter, which runs first, removes them). Punctuation: every ASCII punctuation character.
bool is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
bool is_control(unsigned char c) { return (c < 0x20 && !is_space(c)) || c == 0x7f; }
bool is_punct(unsigned char c) {
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126);
}

}  // namespace

WordPiece::WordPiece(const files::Json& spec, const std::string& vocab_path) {
  std::ifstream file(vocab_path, std::ios::binary);
  if (!file.is_open()) throw Error(vocab_path + " cannot be read");
  int64_t id = 0;
  for (std::string line; std::getline(file, line); ++id) vocab_.emplace(line, id);   // line i: the token of id i
  if (file.bad()) throw Error(vocab_path + " cannot be read");
  prefix_ = spec.at("continuing_subword_prefix").as_string();
  max_chars_ = static_cast<size_t>(spec.at("max_input_chars_per_word").as_int());
  lowercase_ = spec.at("lowercase").as_bool();
  cls_ = spec.at("cls_id").as_int();
  sep_ = spec.at("sep_id").as_int();
  pad_ = spec.at("pad_id").as_int();
  unk_ = spec.at("unk_id").as_int();
  for (const auto& [content, tid] : spec.at("special_tokens").as_object())
    if (!content.empty()) special_.emplace_back(content, tid.as_int());
  for (int64_t t : {cls_, sep_, pad_, unk_})
    if (t < 0 || t >= id)
      throw Error(vocab_path + " has " + std::to_string(id) + " tokens, fewer than the manifest's special token ids "
                  "need; export the model again with `bigr export cpp`");
}

void WordPiece::word_pieces(const std::string& word, std::vector<int64_t>& out) const {
  if (word.size() > max_chars_) return out.push_back(unk_);
  std::vector<int64_t> pieces;
  for (size_t start = 0; start < word.size();) {
    size_t end = word.size();
    int64_t found = -1;
    for (; end > start; --end) {   // the longest piece from `start` that the vocabulary has
      const std::string piece = (start > 0 ? prefix_ : std::string()) + word.substr(start, end - start);
      if (auto it = vocab_.find(piece); it != vocab_.end()) {
        found = it->second;
        break;
      }
    }
    if (found < 0) return out.push_back(unk_);   // a word not covered by pieces is one [UNK]
    pieces.push_back(found);
    start = end;
  }
  out.insert(out.end(), pieces.begin(), pieces.end());
}

std::vector<int64_t> WordPiece::tokens(const std::string& prompt, size_t index) const {
  for (size_t i = 0; i < prompt.size(); ++i)
    if (static_cast<unsigned char>(prompt[i]) >= 0x80)
      throw Error("prompt " + std::to_string(index) + " has a non-ASCII character (byte " + std::to_string(i) +
                  "): the C++ text tokenizer takes ASCII prompts only (BERT's Unicode normalisation, accent "
                  "stripping and CJK splitting are not implemented in C++); encode such prompts in Python "
                  "(bigr_engine.models.text) and pass the embeddings and their mask to generate_text");
  std::vector<int64_t> out;
  std::string word;
  const auto flush = [&] {
    if (!word.empty()) word_pieces(word, out), word.clear();
  };
  // Normalise, pre-tokenize and WordPiece the text between two special tokens.
  const auto segment = [&](size_t a, size_t b) {
    for (size_t i = a; i < b; ++i) {
      const unsigned char c = static_cast<unsigned char>(prompt[i]);
      if (c == 0 || is_control(c)) continue;
      if (is_space(c)) {
        flush();
      } else if (is_punct(c)) {
        flush();
        word = std::string(1, static_cast<char>(c));
        flush();
      } else {
        word += static_cast<char>(lowercase_ && c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
      }
    }
    flush();
  };
  size_t from = 0;
  for (size_t i = 0; i < prompt.size();) {   // special tokens: leftmost first, the longest at a position
    size_t best = 0;
    int64_t best_id = 0;
    for (const auto& [content, tid] : special_)
      if (content.size() > best && prompt.compare(i, content.size(), content) == 0) best = content.size(), best_id = tid;
    if (best == 0) {
      ++i;
      continue;
    }
    segment(from, i);
    out.push_back(best_id);
    i += best;
    from = i;
  }
  segment(from, prompt.size());
  return out;
}

std::pair<at::Tensor, at::Tensor> WordPiece::encode(const std::vector<std::string>& prompts, int64_t L) const {
  if (L < 2) throw Error("a text model needs at least 2 text tokens ([CLS] and [SEP]), this one has " + std::to_string(L));
  const int64_t B = static_cast<int64_t>(prompts.size());
  at::Tensor ids = at::full({B, L}, pad_, at::TensorOptions().dtype(at::kLong));
  at::Tensor mask = at::zeros({B, L}, at::TensorOptions().dtype(at::kBool));
  int64_t* id = ids.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> t = tokens(prompts[b], static_cast<size_t>(b));
    if (static_cast<int64_t>(t.size()) > L - 2) t.resize(static_cast<size_t>(L - 2));   // truncation on the right
    t.insert(t.begin(), cls_);
    t.push_back(sep_);
    const int64_t pad = L - static_cast<int64_t>(t.size());   // padding on the left
    for (size_t k = 0; k < t.size(); ++k) id[b * L + pad + k] = t[k], m[b * L + pad + k] = true;
  }
  return {ids, mask};
}

// ---------------------------------------------------------------------------------------------------------- BERT

BertEncoder::BertEncoder(const files::Json& spec, const Weights& w, const std::string& file, at::Device device) {
  const auto get = [&](const std::string& name) {
    auto it = w.find(name);
    if (it == w.end())
      throw Error(file + " lacks the tensor " + name + ": it was not written by this bigr-engine's `bigr export cpp`; "
                  "export the model again");
    return it->second.to(device, at::kFloat).contiguous();
  };
  const auto linear = [&](const std::string& name) { return Linear{get(name + ".weight"), get(name + ".bias")}; };
  word_ = get("embeddings.word_embeddings.weight");
  position_ = get("embeddings.position_embeddings.weight");
  token_type_ = get("embeddings.token_type_embeddings.weight");
  ln_w_ = get("embeddings.LayerNorm.weight");
  ln_b_ = get("embeddings.LayerNorm.bias");
  heads_ = spec.at("heads").as_int();
  eps_ = spec.at("layer_norm_eps").as_double();
  for (int64_t i = 0; i < spec.at("layers").as_int(); ++i) {
    const std::string p = "encoder.layer." + std::to_string(i) + ".";
    layers_.push_back({linear(p + "attention.self.query"), linear(p + "attention.self.key"),
                       linear(p + "attention.self.value"), linear(p + "attention.output.dense"),
                       linear(p + "intermediate.dense"), linear(p + "output.dense"),
                       get(p + "attention.output.LayerNorm.weight"), get(p + "attention.output.LayerNorm.bias"),
                       get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias")});
  }
  if (dim() % heads_ != 0) throw Error(file + ": width " + std::to_string(dim()) + " is not divisible by " +
                                       std::to_string(heads_) + " heads; export the model again");
}

at::Tensor BertEncoder::operator()(const at::Tensor& ids_in, const at::Tensor& mask_in) const {
  const at::Tensor ids = ids_in.to(word_.device()), mask = mask_in.to(word_.device());
  const int64_t B = ids.size(0), L = ids.size(1), H = dim(), hd = H / heads_;
  if (L > position_.size(0))
    throw Error("the text encoder takes at most " + std::to_string(position_.size(0)) + " tokens, got " +
                std::to_string(L));
  if (B == 0) return at::zeros({0, L, H}, word_.options());
  // BertEmbeddings: word + token type 0, then += the positions 0..L-1 (whatever the padding), LayerNorm
  at::Tensor x = at::embedding(word_, ids) + at::embedding(token_type_, at::zeros_like(ids));
  x = x + at::embedding(position_, at::arange(L, ids.options()).unsqueeze(0));
  x = at::layer_norm(x, {H}, ln_w_, ln_b_, eps_);
  // _prepare_4d_attention_mask_for_sdpa: none when every token is real, else 0 for a key that takes part and the
  // float32 minimum for padding, (B, 1, L, L)
  std::optional<at::Tensor> attn_mask;
  if (!at::all(mask).item<bool>()) {
    const at::Tensor expanded = mask.to(at::kLong).unsqueeze(1).unsqueeze(1).expand({B, 1, L, L}).to(at::kFloat);
    const at::Tensor inverted = 1.0 - expanded;
    attn_mask = inverted.masked_fill(inverted.to(at::kBool), std::numeric_limits<float>::lowest());
  }
  const auto heads = [&](const at::Tensor& t) { return t.view({B, -1, heads_, hd}).transpose(1, 2); };
  for (const Layer& l : layers_) {
    // BertSdpaSelfAttention, BertSelfOutput, BertIntermediate, BertOutput
    const at::Tensor a = at::scaled_dot_product_attention(heads(l.q(x)), heads(l.k(x)), heads(l.v(x)), attn_mask, 0.0,
                                                          false)
                             .transpose(1, 2)
                             .reshape({B, L, H});
    const at::Tensor h = at::layer_norm(l.attn_out(a) + x, {H}, l.ln1_w, l.ln1_b, eps_);
    x = at::layer_norm(l.out(at::gelu(l.intermediate(h))) + h, {H}, l.ln2_w, l.ln2_b, eps_);
  }
  return x.masked_fill(mask.logical_not().unsqueeze(-1), 0.0);
}

}  // namespace bigr::detail
