// bigr::Pipeline: the model directory (manifest.json + safetensors), the options and their checks, generate, decode.
// The messages are Python's (bigr_engine/sampling/options.py, models/bigr.py, models/classes.py, export/manifest.py).
#include "bigr/pipeline.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <sstream>

#include "files.h"
#include "network.h"
#include "sampling.h"
#include "text.h"

extern "C" const char* bigr_ops_build_info();

namespace bigr {

namespace fs = std::filesystem;
using detail::Config;
using files::Json;

constexpr const char* kFormat = "bigr-engine-cpp";
constexpr int64_t kFormatVersion = 2;   // the newest read: 1 (class models), 2 (text models too)

struct Pipeline::Impl {
  ModelInfo info;
  at::Device device{at::kCPU};
  std::unique_ptr<detail::Network> net;
  std::unique_ptr<detail::Decoder> decoder;   // null without a tokenizer
  std::unique_ptr<detail::WordPiece> text_tokenizer;   // a text model's encoder: both, or neither
  std::unique_ptr<detail::BertEncoder> text_encoder;
};

namespace {

// Python's str() of a float: the shortest repr that round-trips, with ".0" on integral values.
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  const auto e = s.find('e');
  if (e != std::string::npos) {   // Python writes 1e+16 and 1e-05: a sign and at least two exponent digits
    std::string mant = s.substr(0, e), ex = s.substr(e + 1);
    const char sign = ex[0] == '-' ? '-' : '+';
    if (ex[0] == '-' || ex[0] == '+') ex = ex.substr(1);
    if (ex.size() < 2) ex = "0" + ex;
    return mant + "e" + sign + ex;
  }
  if (s.find('.') == std::string::npos) s += ".0";
  return s;
}

std::string py_shape(at::IntArrayRef sizes) {   // a Python tuple: (2, 3) or (5,)
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string py_repr(const std::string& s) { return "'" + s + "'"; }

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string trim(const std::string& s) {
  const auto a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// models/classes.py's _norm: case-insensitive, '_' reads as a space, inner spaces collapsed.
std::string norm_name(const std::string& s) {
  std::string t = lower(s), out;
  std::replace(t.begin(), t.end(), '_', ' ');
  std::istringstream in(t);
  for (std::string w; in >> w;) out += (out.empty() ? "" : " ") + w;
  return out;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, ',')) out.push_back(trim(cur));
  return out;
}

Config read_config(const Json& m) {
  const auto i = [&](const char* k) { return m.at(k).as_int(); };
  Config c{i("dim"), i("n_layer"), i("n_head"), i("head_dim"), i("bits"), i("num_tokens"), i("num_classes"),
           i("ffn_dim"), i("transcoder_blocks"), i("transcoder_dim"), i("train_steps"), i("grid"),
           m.at("use_adaln").as_bool(), m.at("norm_eps").as_double()};
  if (m.contains("text_dim")) c.text_dim = i("text_dim");   // absent from version-1 manifests: a class model
  if (m.contains("text_tokens")) c.text_tokens = i("text_tokens");
  return c;
}

SamplingOptions read_sampling(const Json& s) {
  SamplingOptions o;
  o.cfg = s.at("cfg").as_double();
  o.iters = s.at("iters").as_int();
  o.steps = s.at("steps").as_int();
  o.gumbel = s.at("gumbel").as_double();
  o.cfg_schedule = s.at("cfg_schedule").as_string();
  o.gumbel_schedule = s.at("gumbel_schedule").as_string();
  o.temperature = s.at("temperature").as_double();
  o.deterministic = s.at("deterministic").as_bool();
  o.greedy = s.at("greedy").as_bool();
  o.seed = s.at("seed").as_int();
  return o;
}

void check_choice(const char* name, const std::string& v, const std::vector<std::string>& choices) {
  if (std::find(choices.begin(), choices.end(), v) != choices.end()) return;
  std::string all;
  for (const auto& c : choices) all += (all.empty() ? "" : ", ") + c;
  throw Error(std::string(name) + " must be one of " + all + ", got " + py_repr(v));
}

// SamplingOptions.check against a model of N tokens trained with T steps.
void check_options(const SamplingOptions& o, int64_t N, int64_t T) {
  check_choice("cfg_schedule", o.cfg_schedule, {"constant", "linear"});
  check_choice("gumbel_schedule", o.gumbel_schedule, {"constant", "down", "up"});
  for (auto [name, v] : {std::pair{"cfg", o.cfg}, {"gumbel", o.gumbel}, {"temperature", o.temperature}})
    if (!std::isfinite(v)) throw Error(std::string(name) + " must be a finite number, got " + py_float(v));
  if (!(1 <= o.iters && o.iters <= N))
    throw Error("iters must be in 1.." + std::to_string(N) + " (the token count), got " + std::to_string(o.iters));
  if (!(1 <= o.steps && o.steps <= T))
    throw Error("steps must be in 1.." + std::to_string(T) + " (the training steps), got " + std::to_string(o.steps));
  if (o.temperature <= 0) throw Error("temperature must be positive, got " + py_float(o.temperature));
  if (o.cfg < 0 || o.gumbel < 0)
    throw Error("cfg and gumbel must be non-negative, got cfg=" + py_float(o.cfg) + ", gumbel=" + py_float(o.gumbel));
  if (o.seed < 0) throw Error("seed must be in 0..2^63-1, got " + std::to_string(o.seed));
}

void check_files(const fs::path& root, const Json& manifest, bool verify) {
  for (const auto& [name, meta] : manifest.at("files").as_object()) {
    const fs::path f = root / name;
    if (!fs::is_regular_file(f))
      throw Error(root.string() + " is missing " + name + "; export again or copy the whole folder");
    const auto size = static_cast<int64_t>(fs::file_size(f));
    if (size != meta.at("bytes").as_int())
      throw Error(f.string() + " has " + std::to_string(size) + " bytes, the manifest says " +
                  std::to_string(meta.at("bytes").as_int()) +
                  ": the file is truncated or from another export; export again or copy the whole folder");
    if (verify && files::sha256_file(f.string()) != meta.at("sha256").as_string())
      throw Error(f.string() + " does not match its sha256 in the manifest: the file is corrupt or from another "
                  "export; export again or copy the whole folder");
  }
}

at::Device parse_device(const std::string& name) {
  try {
    at::Device d(name);
    if (d.is_cuda() && !at::hasCUDA())
      throw Error("device " + name + ": no CUDA GPU is visible (or this torch has no CUDA); use device \"cpu\"");
    if (!d.is_cpu() && !d.is_cuda()) throw Error("device " + name + ": the pipeline runs on cpu and cuda only");
    return d;
  } catch (const c10::Error&) {
    throw Error("device " + py_repr(name) + " is not a device name; use \"cpu\", \"cuda\" or \"cuda:N\"");
  }
}

// engine.resolve_dtype: None or "auto" -> bfloat16 on CUDA, float32 elsewhere.
at::ScalarType resolve_dtype(const std::optional<std::string>& name, const at::Device& device) {
  if (!name || *name == "auto") return device.is_cuda() ? at::kBFloat16 : at::kFloat;
  if (*name == "float32") return at::kFloat;
  if (*name == "bfloat16") return at::kBFloat16;
  if (*name == "float16") return at::kHalf;
  throw Error("dtype must be auto, float32, bfloat16 or float16, got " + py_repr(*name));
}

// torch.autocast(device, dtype, enabled=dtype != float32) for the current thread (autocast state is thread-local, so
// concurrent calls with different dtypes do not see each other's).
class Autocast {
 public:
  Autocast(at::DeviceType dev, at::ScalarType dtype)
      : dev_(dev), on_(dtype != at::kFloat), was_on_(at::autocast::is_autocast_enabled(dev)),
        was_dtype_(at::autocast::get_autocast_dtype(dev)) {
    if (!on_) return;
    at::autocast::set_autocast_enabled(dev_, true);
    at::autocast::set_autocast_dtype(dev_, dtype);
    at::autocast::increment_nesting();
  }
  ~Autocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(dev_, was_on_);
    at::autocast::set_autocast_dtype(dev_, was_dtype_);
  }
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  at::DeviceType dev_;
  bool on_, was_on_;
  at::ScalarType was_dtype_;
};

}  // namespace

Pipeline Pipeline::load(const std::string& dir, const LoadOptions& options) {
  const fs::path root(dir);
  if (!fs::is_directory(root))
    throw Error(dir + " is not a model directory; make one with `bigr export cpp --out " + dir + "`");
  const fs::path mpath = root / "manifest.json";
  if (!fs::is_regular_file(mpath))
    throw Error(dir + " has no manifest.json, so it is not a bigr-engine C++ model directory; make one with "
                "`bigr export cpp --out DIR`");
  const Json m = files::read_json_file(mpath.string());
  if (!m.is_object() || !m.contains("format") || !m.at("format").is_string() ||
      m.at("format").as_string() != kFormat) {
    std::string got = "None";
    if (m.is_object() && m.contains("format") && m.at("format").is_string()) got = py_repr(m.at("format").as_string());
    throw Error(mpath.string() + " is not a bigr-engine C++ model manifest (format " + got + ", expected '" + kFormat +
                "'); make one with `bigr export cpp`");
  }
  if (!m.contains("format_version") || !m.at("format_version").is_integer() || m.at("format_version").as_int() < 1 ||
      m.at("format_version").as_int() > kFormatVersion)
    throw Error(dir + " was exported in another format version than 1.." + std::to_string(kFormatVersion) +
                ", which this bigr-engine reads; export again with this version");
  for (const char* key : {"model", "sampling", "files"})
    if (!m.contains(key)) throw Error(mpath.string() + " lacks '" + key + "'; export again with `bigr export cpp`");
  check_files(root, m, options.verify);

  auto impl = std::make_shared<Impl>();
  impl->device = parse_device(options.device);
  if (impl->device.is_cuda()) {
    const std::string b = bigr_ops_build_info();
    if (b.find("\"with_cuda\": true") == std::string::npos)
      throw Error("device " + options.device + ": the ops library was built without CUDA kernels; rebuild it with "
                  "nvcc present (pip install --no-build-isolation -e .)");
  }
  const Config cfg = read_config(m.at("model"));
  const std::string kind = m.contains("kind") ? m.at("kind").as_string() : "class";
  if (kind != "class" && kind != "text")
    throw Error(mpath.string() + ": unknown model kind " + py_repr(kind) + " (this bigr-engine reads class and text "
                "models); export again with this version");
  if ((kind == "text") != cfg.is_text() || (cfg.text_dim > 0) != (cfg.text_tokens > 0))
    throw Error(mpath.string() + ": the kind " + py_repr(kind) + " does not match the model's text_dim " +
                std::to_string(cfg.text_dim) + " and text_tokens " + std::to_string(cfg.text_tokens) +
                "; export again with `bigr export cpp`");
  {
    const std::string f = (root / "model.safetensors").string();
    impl->net = std::make_unique<detail::Network>(cfg, files::read_safetensors(f), f, impl->device);
  }
  ModelInfo& info = impl->info;
  info.num_tokens = cfg.num_tokens;
  info.bits = cfg.bits;
  info.num_classes = cfg.num_classes;
  info.kind = kind;
  info.text_tokens = cfg.text_tokens;
  info.text_dim = cfg.text_dim;
  if (cfg.is_text() && m.contains("text_encoder") && m.at("text_encoder").is_object()) {
    const Json& enc = m.at("text_encoder");
    info.text_encoder = enc.at("name").as_string();
    if (enc.contains("bert") && enc.at("bert").is_object()) {
      const Json& bert = enc.at("bert");
      if (enc.at("max_tokens").as_int() != cfg.text_tokens || enc.at("dim").as_int() != cfg.text_dim)
        throw Error(mpath.string() + ": the text encoder's max_tokens and dim do not match the model's text_tokens "
                    "and text_dim; export again with `bigr export cpp`");
      const std::string f = (root / bert.at("weights").as_string()).string();
      impl->text_tokenizer = std::make_unique<detail::WordPiece>(bert, (root / bert.at("vocab").as_string()).string());
      impl->text_encoder = std::make_unique<detail::BertEncoder>(bert, files::read_safetensors(f), f, impl->device);
      if (impl->text_encoder->dim() != cfg.text_dim)
        throw Error(f + ": the text encoder's width is " + std::to_string(impl->text_encoder->dim()) + ", the model "
                    "takes " + std::to_string(cfg.text_dim) + "; export again with `bigr export cpp`");
      info.encodes_prompts = true;
    }
  }
  info.defaults = read_sampling(m.at("sampling"));
  if (m.at("sampling").contains("order") && m.at("sampling").at("order").as_string() != "entropy")
    throw Error(mpath.string() + ": the C++ pipeline samples in entropy order only, the export's default order is " +
                py_repr(m.at("sampling").at("order").as_string()));
  if (m.contains("class_names") && m.at("class_names").is_array())
    for (const Json& n : m.at("class_names").as_array()) info.class_names.push_back(n.as_string());
  if (m.contains("tokenizer") && m.at("tokenizer").is_object()) {
    const std::string f = (root / "tokenizer.safetensors").string();
    impl->decoder = std::make_unique<detail::Decoder>(m.at("tokenizer"), files::read_safetensors(f), f, impl->device);
    info.image_size = impl->decoder->img_size;
    info.channels = impl->decoder->channels;
  }
  return Pipeline(std::move(impl));
}

const ModelInfo& Pipeline::info() const { return impl_->info; }

SamplingOptions Pipeline::resolve(const GenerateOptions& g) const {
  SamplingOptions o = defaults();
  if (g.cfg) o.cfg = *g.cfg;
  if (g.iters) o.iters = *g.iters;
  if (g.steps) o.steps = *g.steps;
  if (g.gumbel) o.gumbel = *g.gumbel;
  if (g.cfg_schedule) o.cfg_schedule = *g.cfg_schedule;
  if (g.gumbel_schedule) o.gumbel_schedule = *g.gumbel_schedule;
  if (g.temperature) o.temperature = *g.temperature;
  if (g.deterministic) o.deterministic = *g.deterministic;
  if (g.greedy) o.greedy = *g.greedy;
  if (g.seed) o.seed = *g.seed;
  check_options(o, impl_->net->cfg().num_tokens, impl_->net->cfg().train_steps);
  return o;
}

std::vector<int64_t> Pipeline::class_ids(const std::vector<std::string>& names) const {
  const auto& all = info().class_names;
  const int64_t C = info().num_classes;
  std::vector<int64_t> ids;
  for (const std::string& raw : names) {
    const std::string item = trim(raw);
    std::string digits = item;
    if (!digits.empty() && (digits[0] == '+' || digits[0] == '-')) digits = digits.substr(1);
    if (!digits.empty() && std::all_of(digits.begin(), digits.end(), ::isdigit)) {
      ids.push_back(std::stoll(item));
      continue;
    }
    if (all.empty())
      throw Error("unknown class name " + py_repr(raw) + ": this model carries no class names; pass ids 0.." +
                  std::to_string(C - 1));
    const std::string key = norm_name(item);
    std::vector<int64_t> hits;
    for (size_t c = 0; c < all.size(); ++c)
      for (const std::string& syn : split_commas(all[c]))
        if (norm_name(syn) == key) {
          hits.push_back(static_cast<int64_t>(c));
          break;
        }
    if (hits.size() == 1) {
      ids.push_back(hits[0]);
      continue;
    }
    if (hits.size() > 1) {
      std::string opts;
      for (int64_t c : hits) opts += (opts.empty() ? "" : ", ") + std::to_string(c) + " (" + split_commas(all[c])[0] + ")";
      throw Error("class name " + py_repr(item) + " is ambiguous: it names classes " + opts + "; pass the id instead");
    }
    std::string hint;
    std::vector<std::string> near;
    for (const std::string& n : all) {
      const std::string s = split_commas(n)[0];
      if (norm_name(s).find(key) != std::string::npos && near.size() < 5) near.push_back(py_repr(s));
    }
    if (!near.empty()) {
      hint = "; did you mean ";
      for (size_t i = 0; i < near.size(); ++i) hint += (i ? ", " : "") + near[i];
      hint += "?";
    } else if (all.size() <= 20) {
      hint = "; this model's classes are ";
      for (size_t c = 0; c < all.size(); ++c) hint += (c ? ", " : "") + std::to_string(c) + " " + split_commas(all[c])[0];
    } else {
      hint = "; pass a class id 0.." + std::to_string(all.size() - 1) + " instead";
    }
    throw Error("unknown class name " + py_repr(item) + hint);
  }
  return ids;
}

namespace {
// BiGRNetwork._check_text's message, for input that is not a text model's condition (`got`: what it was).
[[noreturn]] void not_text_input(const ModelInfo& info, const std::string& got) {
  throw Error("a text model takes prompts (strings) or condition tensors (B, " + std::to_string(info.text_tokens) +
              ", " + std::to_string(1 + info.text_dim) + ") from models.text.pack_condition, got " + got);
}
}  // namespace

at::Tensor Pipeline::generate(const std::vector<int64_t>& labels, const GenerateOptions& options) const {
  if (info().kind == "text") {
    resolve(options);   // as in Python: the options are checked before the labels
    not_text_input(info(), "class ids; pass embeddings and their mask to generate_text, or condition tensors");
  }
  return generate(at::tensor(labels, at::TensorOptions().dtype(at::kLong)), options);
}

at::Tensor Pipeline::generate(const std::vector<std::string>& names, const GenerateOptions& options) const {
  if (info().kind == "text") {   // prompts: options checked first, then encoded (as Python's check_labels)
    resolve(options);
    const TextEmbeddings e = encode_text(names);
    return generate(at::cat({e.mask.unsqueeze(-1).to(at::kFloat), e.embeddings.to(at::kFloat)}, -1), options);
  }
  return generate(class_ids(names), options);
}

TextTokens Pipeline::tokenize(const std::vector<std::string>& prompts) const {
  const Impl& p = *impl_;
  if (p.info.kind != "text")
    throw Error("this is a class-conditional model: it has no text encoder; pass class ids or names to generate()");
  if (!p.text_tokenizer) {
    if (p.info.text_encoder.empty())
      throw Error("this model directory has no text encoder (exported with --text-encoder none): export it again "
                  "with its encoder, or pass the encoder's embeddings and their mask to generate_text");
    throw Error("this model's text encoder " + py_repr(p.info.text_encoder) + " does not run in C++ (only BERT "
                "WordPiece encoders such as minilm do): encode the prompts in Python (bigr_engine.models.text) and "
                "pass the embeddings and their mask to generate_text");
  }
  auto [ids, mask] = p.text_tokenizer->encode(prompts, p.info.text_tokens);
  return {ids.to(p.device), mask.to(p.device)};
}

TextEmbeddings Pipeline::encode_text(const std::vector<std::string>& prompts) const {
  c10::InferenceMode guard;
  const TextTokens t = tokenize(prompts);
  return {(*impl_->text_encoder)(t.ids, t.mask), t.mask};
}

at::Tensor Pipeline::generate_text(const at::Tensor& embeddings, const at::Tensor& mask,
                                   const GenerateOptions& options) const {
  if (info().kind != "text")
    throw Error("this is a class-conditional model: generate_text takes a text-to-image model's directory (`bigr "
                "export cpp --text`, or --ckpt with a text model); pass class ids or names to generate()");
  c10::InferenceMode guard;
  resolve(options);
  // models.text.pack_condition
  if (embeddings.dim() != 3 || mask.dim() != 2 || mask.size(0) != embeddings.size(0) ||
      mask.size(1) != embeddings.size(1))
    throw Error("text embeddings must be (B, L, dim) with a (B, L) mask, got " + py_shape(embeddings.sizes()) +
                " and " + py_shape(mask.sizes()));
  if (!at::all(at::any(mask, 1)).item<bool>())
    throw Error("every prompt needs at least one token in its mask (an encoder's empty prompt has two: [CLS] and "
                "[SEP])");
  return generate(at::cat({mask.unsqueeze(-1).to(at::kFloat), embeddings.to(at::kFloat)}, -1), options);
}

at::Tensor Pipeline::generate(const at::Tensor& labels_in, const GenerateOptions& options) const {
  c10::InferenceMode guard;
  const Impl& p = *impl_;
  const int64_t C = p.info.num_classes;
  const SamplingOptions o = resolve(options);   // model.generate resolves the options before it checks the labels
  at::Tensor labels = labels_in.to(p.device);
  if (p.info.kind == "text") {   // BiGRNetwork._check_text
    if (labels.dim() != 3 || labels.size(1) != p.info.text_tokens || labels.size(2) != 1 + p.info.text_dim)
      not_text_input(p.info, py_shape(labels.sizes()));
    labels = labels.to(at::kFloat);
  } else if (labels.is_floating_point()) {   // BiGRNetwork.check_labels
    if (labels.dim() != 2 || labels.size(1) != C + 1)
      throw Error("class weights must be (B, " + std::to_string(C + 1) + "), got " + py_shape(labels.sizes()));
  } else {
    labels = labels.to(at::kLong).reshape({-1});
    const at::Tensor bad = labels.masked_select((labels < 0).logical_or(labels > C));
    if (bad.numel())
      throw Error("class id " + std::to_string(bad[0].item<int64_t>()) + " is out of range: this model has classes 0.." +
                  std::to_string(C - 1) + " (and " + std::to_string(C) + " for the null class)");
  }
  const int64_t B = labels.size(0);
  at::Tensor sample_index;
  if (options.sample_index.empty()) {
    sample_index = at::arange(B, at::TensorOptions().dtype(at::kLong).device(p.device));
  } else {
    if (static_cast<int64_t>(options.sample_index.size()) != B)
      throw Error("sample_index needs one entry per label: " + std::to_string(options.sample_index.size()) + " for " +
                  std::to_string(B) + " labels");
    sample_index = at::tensor(options.sample_index, at::TensorOptions().dtype(at::kLong)).to(p.device);
  }
  const at::ScalarType dtype = resolve_dtype(options.dtype, p.device);
  if (B == 0)
    return at::zeros({0, p.info.num_tokens, p.info.bits}, at::TensorOptions().dtype(at::kByte).device(p.device));
  const Autocast autocast(p.device.type(), dtype);
  return detail::generate(*p.net, labels, sample_index, o);
}

at::Tensor Pipeline::decode(const at::Tensor& codes_in) const {
  c10::InferenceMode guard;
  const Impl& p = *impl_;
  if (!p.decoder)
    throw Error("this model directory has no tokenizer, so it cannot decode; export it with one: "
                "`bigr export cpp --ckpt MODEL --bae TOKENIZER --out DIR`");
  const detail::Decoder& d = *p.decoder;
  if (codes_in.dim() != 3 || codes_in.size(-1) != d.bits)
    throw Error("codes must be (B, N, " + std::to_string(d.bits) + ") for this " + std::to_string(d.bits) +
                "-bit tokenizer, got shape " + py_shape(codes_in.sizes()));
  if (codes_in.size(1) != d.grid * d.grid)
    throw Error("this tokenizer decodes " + std::to_string(d.grid) + "x" + std::to_string(d.grid) + " = " +
                std::to_string(d.grid * d.grid) + " tokens per image, got " + std::to_string(codes_in.size(1)));
  const at::Tensor codes = codes_in.to(p.device);
  // io.images.decode_to_uint8: batches of exactly decode_group images (the last padded with copies of its first),
  // so an image's pixels do not depend on how many were decoded with it; then to_uint8.
  std::vector<at::Tensor> out;
  const int64_t G = d.decode_group, B = codes.size(0);
  for (int64_t a = 0; a < B; a += G) {
    at::Tensor chunk = codes.slice(0, a, std::min(a + G, B));
    const int64_t n = chunk.size(0);
    if (n < G) chunk = at::cat({chunk, chunk.slice(0, 0, 1).expand({G - n, chunk.size(1), chunk.size(2)})});
    const at::Tensor img = d.decode(chunk).slice(0, 0, n);
    out.push_back(at::nan_to_num(img, 0.0).clamp(0.0, 1.0).mul(255.0).round().to(at::kByte).permute({0, 2, 3, 1}));
  }
  if (out.empty())
    return at::zeros({0, d.img_size, d.img_size, d.channels}, at::TensorOptions().dtype(at::kByte).device(p.device));
  return at::cat(out).contiguous();
}

std::string build_info() {
  return std::string("bigr-engine C++ API ") + BIGR_VERSION + "; ops library " + bigr_ops_build_info();
}

}  // namespace bigr
