// Self-contained readers for the files of a model directory written by `bigr export cpp`: JSON (config, manifest),
// SHA-256 (integrity checks against the manifest) and safetensors (weights). No third-party dependencies beyond ATen.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "bigr/pipeline.h"  // bigr::Error

namespace bigr::files {

class JsonParser;

// An immutable parsed JSON value. Every value remembers where it came from (its context: the parsed text's name
// followed by subscripts, e.g. `model/config.json["sampling"]["cfg"]`) so that accessor errors name the culprit:
// `at("k")` on an object without "k" throws bigr::Error("<context>: missing key 'k'"), `as_int()` on a string throws
// "<context> is a string, expected an integer". Copies are cheap (arrays and objects are shared).
class Json {
 public:
  using Array = std::vector<Json>;
  using Object = std::map<std::string, Json>;  // keys sorted; a duplicate key keeps its last value, as in Python

  Json() = default;  // null

  bool is_null() const { return value_.index() == 0; }
  bool is_bool() const { return value_.index() == 1; }
  bool is_number() const { return value_.index() == 2; }
  bool is_string() const { return value_.index() == 3; }
  bool is_array() const { return value_.index() == 4; }
  bool is_object() const { return value_.index() == 5; }
  // A number written without fraction or exponent that fits in int64 (Python's json writes ints this way).
  bool is_integer() const { return is_number() && integral_; }

  bool as_bool() const;
  double as_double() const;    // any number (integers too)
  int64_t as_int() const;      // only is_integer() numbers: 3.0 or 1e3 are an error, as they are floats in Python
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;

  size_t size() const;                                // elements of an array or object
  bool contains(const std::string& key) const;        // false when not an object
  const Json& at(const std::string& key) const;       // object member; throws when missing
  const Json& operator[](size_t index) const;         // array element; throws when out of range
  const std::string& context() const { return context_; }

 private:
  friend class JsonParser;
  using Value = std::variant<std::monostate, bool, double, std::string, std::shared_ptr<const Array>,
                             std::shared_ptr<const Object>>;
  Json(Value value, std::string context) : value_(std::move(value)), context_(std::move(context)) {}
  [[noreturn]] void type_error(const char* expected) const;

  Value value_;
  bool integral_ = false;
  int64_t int_ = 0;
  std::string context_;
};

// Parses a whole JSON text (RFC 8259, plus Python's NaN/Infinity/-Infinity, which `json.dump` writes by default).
// Malformed input throws bigr::Error("<what> is not valid JSON (<reason> at byte <offset>)"); the root's context is `what`.
Json parse_json(const std::string& text, const std::string& what);
// Reads and parses a file (what = path); bigr::Error("<path> cannot be read") when it cannot be opened.
Json read_json_file(const std::string& path);

// Lowercase hex SHA-256 of a whole file (read in 1 MiB blocks) or of a byte string.
std::string sha256_file(const std::string& path);
std::string sha256_bytes(const std::string& data);

// Reads a safetensors file into CPU tensors that own their memory. Dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
// When `metadata` is given it receives the header's "__metadata__" (empty when absent). Any defect throws
// bigr::Error("<path> is not a valid safetensors file (<reason>); export the model again with `bigr export cpp`").
std::map<std::string, at::Tensor> read_safetensors(const std::string& path,
                                                   std::map<std::string, std::string>* metadata = nullptr);

}  // namespace bigr::files
