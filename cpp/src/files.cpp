#include "files.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string_view>

namespace bigr::files {

// ---------------------------------------------------------------------------------------------------------------- JSON

void Json::type_error(const char* expected) const {
  static const char* names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
  throw Error(context_ + " is " + names[value_.index()] + ", expected " + expected);
}
bool Json::as_bool() const { return is_bool() ? std::get<bool>(value_) : (type_error("a boolean"), false); }
double Json::as_double() const { return is_number() ? std::get<double>(value_) : (type_error("a number"), 0.0); }
int64_t Json::as_int() const {
  if (is_integer()) return int_;
  if (is_number()) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", std::get<double>(value_));
    throw Error(context_ + " is a float (" + text + "), expected an integer");  // 3.0 too: a float in Python
  }
  type_error("an integer");
}
const std::string& Json::as_string() const { if (!is_string()) type_error("a string"); return std::get<3>(value_); }
const Json::Array& Json::as_array() const { if (!is_array()) type_error("an array"); return *std::get<4>(value_); }
const Json::Object& Json::as_object() const { if (!is_object()) type_error("an object"); return *std::get<5>(value_); }
size_t Json::size() const {
  if (!is_array() && !is_object()) type_error("an array or an object");
  return is_array() ? as_array().size() : as_object().size();
}
bool Json::contains(const std::string& key) const { return is_object() && as_object().count(key) > 0; }
const Json& Json::at(const std::string& key) const {
  const Object& object = as_object();
  auto it = object.find(key);
  if (it == object.end()) throw Error(context_ + ": missing key '" + key + "'");
  return it->second;
}
const Json& Json::operator[](size_t index) const {
  const Array& array = as_array();
  if (index >= array.size())
    throw Error(context_ + " has " + std::to_string(array.size()) + " elements, index " + std::to_string(index) +
                " is out of range");
  return array[index];
}

// Recursive descent over the bytes; `i_` is the offset reported in errors.
class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& what) : s_(text), what_(what) {}

  Json parse() {
    Json root = value(what_, 0);
    skip_ws();
    if (i_ < s_.size()) fail("unexpected trailing " + describe(s_[i_]));
    return root;
  }

 private:
  static constexpr int kMaxDepth = 512;  // deeper nesting would only come from a hostile file; keep the stack safe

  [[noreturn]] void fail(const std::string& reason) const {
    throw Error(what_ + " is not valid JSON (" + reason + " at byte " + std::to_string(i_) + ")");
  }
  static std::string describe(char c) {
    if (c >= 0x21 && c < 0x7f) return std::string("character '") + c + "'";
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", static_cast<unsigned char>(c));
    return std::string("byte ") + hex;
  }
  [[noreturn]] void unexpected() const { at_end() ? fail("unexpected end of input") : fail("unexpected " + describe(s_[i_])); }
  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[i_]; }
  bool digit() const { return peek() >= '0' && peek() <= '9'; }
  void skip_ws() {
    while (!at_end() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  Json value(const std::string& context, int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
    skip_ws();
    switch (peek()) {
      case '{': return object(context, depth);
      case '[': return array(context, depth);
      case '"': return Json(string(), context);
      case 't': if (literal("true")) return Json(true, context); break;
      case 'f': if (literal("false")) return Json(false, context); break;
      case 'n': if (literal("null")) return Json(std::monostate{}, context); break;
      case 'N': if (literal("NaN")) return Json(std::numeric_limits<double>::quiet_NaN(), context); break;
      case 'I': if (literal("Infinity")) return Json(std::numeric_limits<double>::infinity(), context); break;
      default: if (peek() == '-' || digit()) return number(context);
    }
    unexpected();
  }

  // The elements of an array or object: `element` parses one, the loop the ',' between them and the closing bracket.
  template <class Element> void elements(char close, Element element) {
    ++i_;  // the opening bracket
    skip_ws();
    if (peek() == close) return void(++i_);
    for (;; ++i_) {
      element();
      skip_ws();
      if (peek() == close) return void(++i_);
      if (peek() != ',') at_end() ? unexpected() : fail(std::string("expected ',' or '") + close + "', got " + describe(s_[i_]));
    }
  }
  Json object(const std::string& context, int depth) {
    auto members = std::make_shared<Json::Object>();
    elements('}', [&] {
      skip_ws();
      if (peek() != '"') at_end() ? unexpected() : fail("expected a string key, got " + describe(s_[i_]));
      std::string key = string();
      skip_ws();
      if (peek() != ':') unexpected();
      ++i_;
      members->insert_or_assign(key, value(context + "[\"" + key + "\"]", depth + 1));
    });
    return Json(std::shared_ptr<const Json::Object>(std::move(members)), context);
  }
  Json array(const std::string& context, int depth) {
    auto items = std::make_shared<Json::Array>();
    elements(']', [&] { items->push_back(value(context + "[" + std::to_string(items->size()) + "]", depth + 1)); });
    return Json(std::shared_ptr<const Json::Array>(std::move(items)), context);
  }

  uint32_t hex4() {
    uint32_t code = 0;
    for (int k = 0; k < 4; ++k, ++i_) {
      char c = peek();
      int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (v < 0) fail("invalid \\u escape");
      code = code * 16 + v;
    }
    return code;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    int tail = cp < 0x80 ? 0 : cp < 0x800 ? 1 : cp < 0x10000 ? 2 : 3;  // continuation bytes after the lead byte
    static const unsigned char lead[] = {0x00, 0xC0, 0xE0, 0xF0};
    out += char(lead[tail] | cp >> 6 * tail);
    for (int k = tail - 1; k >= 0; --k) out += char(0x80 | (cp >> 6 * k & 0x3F));
  }

  // Bytes >= 0x80 pass through unchanged: the text is taken to be UTF-8, as JSON requires.
  std::string string() {
    ++i_;  // '"'
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      char c = s_[i_];
      if (c == '"') return ++i_, std::move(out);
      if (static_cast<unsigned char>(c) < 0x20) fail("unescaped control " + describe(c) + " in string");
      ++i_;
      if (c != '\\') { out += c; continue; }
      if (at_end()) fail("unterminated string");
      static constexpr std::string_view escapes = "\"\\/bfnrt", escaped = "\"\\/\b\f\n\r\t";
      c = s_[i_++];
      if (size_t k = escapes.find(c); k != escapes.npos) {
        out += escaped[k];
        continue;
      }
      if (c != 'u') --i_, fail("invalid escape \\" + std::string(1, c));
      uint32_t cp = hex4();
      if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate");
      if (cp >= 0xD800 && cp <= 0xDBFF) {  // UTF-16 pair: the low half must follow as another \u escape
        if (!literal("\\u")) fail("unpaired high surrogate");
        uint32_t low = hex4();
        if (low < 0xDC00 || low > 0xDFFF) fail("unpaired high surrogate");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
      }
      append_utf8(out, cp);
    }
  }

  Json number(const std::string& context) {
    size_t start = i_;
    bool negative = peek() == '-';
    if (negative) ++i_;
    if (literal("Infinity")) return Json(-std::numeric_limits<double>::infinity(), context);
    if (!digit()) unexpected();
    if (peek() == '0') ++i_;  // no leading zeros: "01" leaves "1" as trailing garbage
    else while (digit()) ++i_;
    bool integral = true;
    if (peek() == '.') {
      integral = false, ++i_;
      if (!digit()) fail("expected a digit after '.'");
      while (digit()) ++i_;
    }
    size_t exponent_at = i_;
    if (peek() == 'e' || peek() == 'E') {
      integral = false, ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!digit()) fail("expected a digit in the exponent");
      while (digit()) ++i_;
    }
    const char *begin = s_.data() + start, *end = s_.data() + i_;
    double d = 0;
    if (std::from_chars(begin, end, d).ec == std::errc::result_out_of_range) {
      // from_chars leaves `d` alone when the value overflows or underflows; Python's json gives +-inf or +-0.0.
      // Decide which from the decimal magnitude: the first significant digit's position plus the exponent.
      std::string mantissa = s_.substr(start + negative, exponent_at - start - negative);
      size_t point = std::min(mantissa.find('.'), mantissa.size());
      size_t first = mantissa.find_first_not_of("0.");
      long magnitude = first == std::string::npos ? 0 : first < point ? long(point - first) : -long(first - point) + 1;
      if (exponent_at < i_) magnitude += std::clamp(std::strtol(s_.c_str() + exponent_at + 1, nullptr, 10), -100000L, 100000L);
      d = magnitude > 0 ? std::numeric_limits<double>::infinity() : 0.0;
      if (negative) d = -d;
    }
    Json json(d, context);
    // Integers beyond int64 stay plain doubles, as is_integer() then reports.
    json.integral_ = integral && std::from_chars(begin, end, json.int_).ec == std::errc();
    return json;
  }

  const std::string& s_;
  const std::string& what_;
  size_t i_ = 0;
};

Json parse_json(const std::string& text, const std::string& what) { return JsonParser(text, what).parse(); }

namespace {
std::ifstream open_or_throw(const std::string& path) {
  std::error_code ec;
  std::ifstream file;
  if (!std::filesystem::is_directory(path, ec)) file.open(path, std::ios::binary);
  if (!file.is_open()) throw Error(path + " cannot be read");
  return file;
}
}  // namespace

Json read_json_file(const std::string& path) {
  std::ifstream file = open_or_throw(path);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (file.bad()) throw Error(path + " cannot be read");
  return parse_json(text, path);
}

// ------------------------------------------------------------------------------------------------------------- SHA-256

namespace {
// FIPS 180-4. Bytes are buffered into 64-byte blocks; finish() appends the 0x80, zero padding and 64-bit bit length.
class Sha256 {
 public:
  void update(const unsigned char* data, size_t n) {
    total_ += n;
    while (n > 0) {
      size_t take = std::min(n, 64 - used_);
      std::memcpy(buffer_ + used_, data, take);
      used_ += take, data += take, n -= take;
      if (used_ == 64) compress(buffer_), used_ = 0;
    }
  }
  std::string finish() {
    uint64_t bits = total_ * 8;
    unsigned char pad[72] = {0x80};
    size_t pad_len = (used_ < 56 ? 56 : 120) - used_;
    for (int k = 0; k < 8; ++k) pad[pad_len + k] = static_cast<unsigned char>(bits >> (56 - 8 * k));
    update(pad, pad_len + 8);
    static const char digits[] = "0123456789abcdef";
    std::string hex;
    for (uint32_t word : h_)
      for (int shift = 28; shift >= 0; shift -= 4) hex += digits[(word >> shift) & 0xF];
    return hex;
  }

 private:
  void compress(const unsigned char* block) {
    static constexpr uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int t = 0; t < 16; ++t)
      w[t] = uint32_t(block[4 * t]) << 24 | uint32_t(block[4 * t + 1]) << 16 | uint32_t(block[4 * t + 2]) << 8 |
             uint32_t(block[4 * t + 3]);
    for (int t = 16; t < 64; ++t) {
      uint32_t s0 = std::rotr(w[t - 15], 7) ^ std::rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      uint32_t s1 = std::rotr(w[t - 2], 17) ^ std::rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t t1 = h + (std::rotr(e, 6) ^ std::rotr(e, 11) ^ std::rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t];
      uint32_t t2 = (std::rotr(a, 2) ^ std::rotr(a, 13) ^ std::rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buffer_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};
}  // namespace

std::string sha256_bytes(const std::string& data) {
  Sha256 sha;
  sha.update(reinterpret_cast<const unsigned char*>(data.data()), data.size());
  return sha.finish();
}

std::string sha256_file(const std::string& path) {
  std::ifstream file = open_or_throw(path);
  Sha256 sha;
  std::vector<char> block(1 << 20);
  while (file) {
    file.read(block.data(), block.size());
    sha.update(reinterpret_cast<const unsigned char*>(block.data()), static_cast<size_t>(file.gcount()));
  }
  if (file.bad()) throw Error(path + " cannot be read");
  return sha.finish();
}

// --------------------------------------------------------------------------------------------------------- safetensors

// Tensor bytes are copied as they lie in the file, which safetensors defines as little-endian.
static_assert(std::endian::native == std::endian::little, "read_safetensors assumes a little-endian host");

std::map<std::string, at::Tensor> read_safetensors(const std::string& path,
                                                   std::map<std::string, std::string>* metadata) {
  struct Invalid : Error {  // already phrased for this file: not to be wrapped again below
    using Error::Error;
  };
  auto invalid = [&](const std::string& reason) {
    return Invalid(path + " is not a valid safetensors file (" + reason + "); export the model again with `bigr export cpp`");
  };
  static const std::map<std::string, std::pair<at::ScalarType, int64_t>> dtypes = {
      {"F64", {at::kDouble, 8}}, {"F32", {at::kFloat, 4}}, {"F16", {at::kHalf, 2}}, {"BF16", {at::kBFloat16, 2}},
      {"I64", {at::kLong, 8}},   {"I32", {at::kInt, 4}},   {"I16", {at::kShort, 2}}, {"I8", {at::kChar, 1}},
      {"U8", {at::kByte, 1}},    {"BOOL", {at::kBool, 1}}};

  std::ifstream file = open_or_throw(path);
  file.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(file.tellg());
  file.seekg(0);
  if (file_size < 8) throw invalid("it is " + std::to_string(file_size) + " bytes long, shorter than the 8-byte header length");
  unsigned char prefix[8];
  file.read(reinterpret_cast<char*>(prefix), 8);
  uint64_t header_len = 0;
  for (int k = 7; k >= 0; --k) header_len = header_len << 8 | prefix[k];
  if (header_len > file_size - 8)
    throw invalid("header length " + std::to_string(header_len) + " runs past the end of the file (" +
                  std::to_string(file_size) + " bytes)");
  std::string header_text(header_len, '\0');
  if (!file.read(header_text.data(), static_cast<std::streamsize>(header_len))) throw Error(path + " cannot be read");
  const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;

  struct Entry {
    std::string name;
    at::ScalarType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, nbytes;
  };
  std::vector<Entry> entries;
  std::map<std::string, std::string> meta;
  // Validate the whole header before allocating anything. Json's own errors (a wrong type, a missing key) name the
  // offending entry through their context, e.g. `header["w"]["shape"][0] is a string, expected an integer`.
  try {
    Json header = parse_json(header_text, "header");
    for (const auto& [name, entry] : header.as_object()) {
      if (name == "__metadata__") {
        for (const auto& [key, value] : entry.as_object())
          meta[key] = value.as_string();
        continue;
      }
      auto dtype = dtypes.find(entry.at("dtype").as_string());
      if (dtype == dtypes.end()) throw invalid("tensor '" + name + "' has unsupported dtype '" + entry.at("dtype").as_string() + "'");
      Entry e{name, dtype->second.first, {}, 0, 0};
      uint64_t numel = 1, span = 1;  // span: the product of max(dim, 1), which ATen's contiguous strides must hold
      for (const Json& dim : entry.at("shape").as_array()) {
        int64_t n = dim.as_int();
        if (n < 0) throw invalid("tensor '" + name + "' has a negative dimension");
        if (__builtin_mul_overflow(span, static_cast<uint64_t>(std::max<int64_t>(n, 1)), &span) || span > INT64_MAX)
          throw invalid("tensor '" + name + "' has a shape too large to hold");
        e.shape.push_back(n), numel *= n;  // numel <= span: no overflow
      }
      const Json& offsets = entry.at("data_offsets");
      if (offsets.as_array().size() != 2) throw invalid("tensor '" + name + "' data_offsets is not [begin, end]");
      int64_t begin = offsets[0].as_int(), end = offsets[1].as_int();
      if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_size)
        throw invalid("tensor '" + name + "' data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                      "] lie outside the data section of " + std::to_string(data_size) + " bytes");
      e.begin = begin, e.nbytes = end - begin;
      uint64_t itemsize = dtype->second.second;
      uint64_t need;
      if (bool huge = __builtin_mul_overflow(numel, itemsize, &need); huge || need != e.nbytes)
        throw invalid("tensor '" + name + "' has " + std::to_string(e.nbytes) + " bytes, but its shape and dtype need " +
                      (huge ? std::string("over 2^64") : std::to_string(need)));
      entries.push_back(std::move(e));
    }
  } catch (const Invalid&) {
    throw;
  } catch (const Error& error) {
    throw invalid(error.what());
  }

  std::map<std::string, at::Tensor> tensors;
  for (const Entry& e : entries) {
    at::Tensor tensor = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    file.seekg(static_cast<std::streamoff>(data_start + e.begin));
    if (!file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(e.nbytes)))
      throw Error(path + " cannot be read");
    if (e.dtype == at::kBool) {  // a byte other than 0/1 in a torch bool tensor is undefined behaviour downstream
      const auto* bytes = static_cast<const unsigned char*>(tensor.data_ptr());
      for (uint64_t k = 0; k < e.nbytes; ++k)
        if (bytes[k] > 1) throw invalid("tensor '" + e.name + "' holds BOOL bytes other than 0 and 1");
    }
    tensors.emplace(e.name, std::move(tensor));
  }
  if (metadata) *metadata = std::move(meta);
  return tensors;
}

}  // namespace bigr::files
