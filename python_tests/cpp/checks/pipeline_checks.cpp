// pipeline-checks MODE MODEL_DIR ...: one check of the C++ API per call (python_tests/cpp/test_cpp_api.py).
//   concurrent DIR THREADS          every call of a set, from THREADS threads at once, equals the same call made alone
//   weights DIR OUT.npy SEED        codes of three class-weight rows (a one-hot row, a 50/50 mix, a 3-way mix)
//   error DIR OPTION VALUE          prints the bigr::Error message of one bad input ("error: ..."), exit 0 if thrown
//   info DIR                        prints info()'s kind and text fields, one "key=value" a line
//   text DIR COND.npy OUT.npy [split=1] [KEY=VALUE...]
//                                   a text model's codes of condition tensors (B, L, 1 + dim) float32 by generate(tensor);
//                                   split=1: by generate_text(embeddings, mask) too (exit 1 if the two differ); KEY: a
//                                   GenerateOptions field (sample_index as a comma list)
//   tokenize DIR PROMPTS.bin IDS.npy MASK.npy
//                                   tokenize() of the prompts (each a uint32 little-endian byte count, then its bytes):
//                                   ids int64 and mask uint8 (B, L)
//   encode DIR PROMPTS.bin EMB.npy  encode_text() of the prompts: the embeddings float32 (B, L, dim)
#include <ATen/Parallel.h>
#include <bigr/pipeline.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <thread>

#include "image_files.h"

namespace {

struct Call {
  std::vector<int64_t> labels;
  bigr::GenerateOptions options;
};

std::vector<Call> calls(const bigr::Pipeline& p) {
  std::vector<Call> out;
  const int64_t C = p.info().num_classes;
  for (int64_t i = 0; i < 6; ++i) {
    Call c;
    c.labels = {i % C, (i + 3) % C};
    c.options.seed = 100 + i;
    c.options.sample_index = {i, i + 7};
    if (i % 3 == 1) c.options.greedy = true;
    if (i % 3 == 2) c.options.cfg = 1.0;
    out.push_back(c);
  }
  return out;
}

int concurrent(const bigr::Pipeline& p, int threads) {
  const std::vector<Call> cs = calls(p);
  std::vector<at::Tensor> alone, images_alone;
  for (const Call& c : cs) {
    alone.push_back(p.generate(c.labels, c.options));
    if (p.info().image_size) images_alone.push_back(p.decode(alone.back()));
  }
  std::atomic<int> bad{0}, done{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (size_t k = 0; k < cs.size(); ++k) {   // each thread walks the calls from its own starting point
        const size_t i = (k + t) % cs.size();
        const at::Tensor got = p.generate(cs[i].labels, cs[i].options);
        if (!at::equal(got, alone[i])) ++bad;
        if (p.info().image_size && !at::equal(p.decode(got), images_alone[i])) ++bad;
        ++done;
      }
    });
  for (auto& th : pool) th.join();
  std::cout << done.load() << " calls on " << threads << " threads, " << bad.load() << " differ from the same call alone\n";
  return bad.load() == 0 ? 0 : 1;
}

// A C-order little-endian float32 .npy (format 1.0 or 2.0) -> a CPU tensor.
at::Tensor read_npy_f32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  const std::string b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (b.size() < 12 || b.compare(0, 6, "\x93NUMPY") != 0) throw std::runtime_error(path + ": not a .npy file");
  const bool v1 = b[6] == 1;
  const size_t len = v1 ? (uint8_t(b[8]) | uint8_t(b[9]) << 8)
                        : (uint8_t(b[8]) | uint8_t(b[9]) << 8 | uint8_t(b[10]) << 16 | size_t(uint8_t(b[11])) << 24);
  const size_t start = (v1 ? 10 : 12) + len;
  const std::string header = b.substr(v1 ? 10 : 12, len);
  if (header.find("'<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected a C-order float32 array");
  std::vector<int64_t> shape;
  std::stringstream dims(header.substr(header.find('(') + 1, header.find(')') - header.find('(') - 1));
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(d));
  at::Tensor t = at::empty(shape, at::kFloat);
  if (b.size() - start != static_cast<size_t>(t.numel()) * 4) throw std::runtime_error(path + ": truncated data");
  std::memcpy(t.data_ptr(), b.data() + start, b.size() - start);
  return t;
}

// A C-order .npy of `descr` ('<i8', '<f4', '|u1') from a contiguous CPU tensor.
void write_npy(const std::string& path, const at::Tensor& t, const std::string& descr) {
  std::string dims;
  for (int64_t d : t.sizes()) dims += std::to_string(d) + ", ";
  if (t.dim() > 1) dims.resize(dims.size() - 2);
  else if (t.dim() == 1) dims.resize(dims.size() - 1);
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string out = "\x93NUMPY";
  out += {'\x01', '\x00', static_cast<char>(header.size() & 0xFF), static_cast<char>(header.size() >> 8)};
  out += header;
  out.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
  std::ofstream(path, std::ios::binary) << out;
}

std::vector<std::string> read_prompts(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  const std::string b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  for (size_t i = 0; i + 4 <= b.size();) {
    const size_t n = uint8_t(b[i]) | uint8_t(b[i + 1]) << 8 | uint8_t(b[i + 2]) << 16 | size_t(uint8_t(b[i + 3])) << 24;
    out.push_back(b.substr(i + 4, n));
    i += 4 + n;
  }
  return out;
}

// Sets the GenerateOptions field named k from its text v ("cfg", "seed", "sample_index" as "5,4,3", ...); false when
// k names none of them.
bool set_option(bigr::GenerateOptions& o, const std::string& k, const std::string& v) {
  if (k == "cfg") o.cfg = std::stod(v);
  else if (k == "gumbel") o.gumbel = std::stod(v);
  else if (k == "temperature") o.temperature = std::stod(v);
  else if (k == "iters") o.iters = std::stoll(v);
  else if (k == "steps") o.steps = std::stoll(v);
  else if (k == "seed") o.seed = std::stoll(v);
  else if (k == "cfg_schedule") o.cfg_schedule = v;
  else if (k == "gumbel_schedule") o.gumbel_schedule = v;
  else if (k == "deterministic") o.deterministic = v == "1";
  else if (k == "greedy") o.greedy = v == "1";
  else if (k == "dtype") o.dtype = v;
  else if (k == "sample_index") {
    std::stringstream ss(v);
    for (std::string x; std::getline(ss, x, ',');) o.sample_index.push_back(std::stoll(x));
  } else {
    return false;
  }
  return true;
}

bigr::GenerateOptions parse_options(int argc, char** argv, int first) {
  bigr::GenerateOptions o;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    const auto eq = a.find('=');
    const std::string k = a.substr(0, eq), v = a.substr(eq + 1);
    if (!set_option(o, k, v)) throw std::runtime_error("unknown option " + k);
  }
  return o;
}

int text(const bigr::Pipeline& p, const std::string& cond_path, const std::string& out, bool split,
         const bigr::GenerateOptions& o) {
  const at::Tensor cond = read_npy_f32(cond_path);
  const at::Tensor codes = p.generate(cond, o).cpu().contiguous();
  if (split && !at::equal(codes, p.generate_text(cond.slice(-1, 1), cond.select(-1, 0) > 0.5, o).cpu())) {
    std::cerr << "generate(condition) and generate_text(embeddings, mask) differ\n";
    return 1;
  }
  std::ofstream(out, std::ios::binary) << npy_bytes(codes.data_ptr<uint8_t>(), {codes.size(0), codes.size(1), codes.size(2)});
  return 0;
}

int weights(const bigr::Pipeline& p, const std::string& out, int64_t seed) {
  const int64_t C = p.info().num_classes;
  at::Tensor w = at::zeros({3, C + 1}, at::kFloat);
  w[0][1] = 1.0;
  w[1][0] = 0.5;
  w[1][2] = 0.5;
  w[2][0] = 0.25;
  w[2][1] = 0.25;
  w[2][C] = 0.5;
  bigr::GenerateOptions o;
  o.seed = seed;
  const at::Tensor codes = p.generate(w, o).cpu().contiguous();
  std::ofstream(out, std::ios::binary) << npy_bytes(codes.data_ptr<uint8_t>(), {codes.size(0), codes.size(1), codes.size(2)});
  return 0;
}

int error(const bigr::Pipeline& p, const std::string& key, const std::string& v) {
  bigr::GenerateOptions o;
  std::vector<int64_t> labels = {0};
  const int64_t L = p.info().text_tokens, D = p.info().text_dim;
  try {
    // text-model inputs: VALUE is a shape "B,L,C" where one is needed
    const auto shape = [&] {
      std::vector<int64_t> out;
      std::stringstream dims(v);
      for (std::string d; std::getline(dims, d, ',');) out.push_back(std::stoll(d));
      return out;
    };
    if (key == "text_condition") { p.generate(at::zeros(shape(), at::kFloat), o); return 1; }   // generate(tensor)
    if (key == "text_embeddings") {   // generate_text of embeddings `shape` with a (B, L) mask of ones
      p.generate_text(at::zeros(shape(), at::kFloat), at::ones({2, L}, at::kBool), o);
      return 1;
    }
    if (key == "text_empty_mask") {   // row 1 of the mask all false
      at::Tensor mask = at::ones({2, L}, at::kBool);
      mask[1].fill_(false);
      p.generate_text(at::zeros({2, L, D}, at::kFloat), mask, o);
      return 1;
    }
    if (key == "text_on_class") { p.generate_text(at::zeros({1, 4, 8}), at::ones({1, 4}, at::kBool), o); return 1; }
    if (key == "class_ids_on_text") { p.generate(std::vector<int64_t>{std::stoll(v)}, o); return 1; }
    if (key == "strings_on_text") { p.generate(std::vector<std::string>{v}, o); return 1; }
    if (key == "class_name") { p.generate(std::vector<std::string>{v}, o); return 1; }
    if (key == "weights") { p.generate(at::zeros({2, std::stoll(v)}, at::kFloat), o); return 1; }
    if (key == "decode") { p.decode(at::zeros({1, std::stoll(v), p.info().bits}, at::kByte)); return 1; }
    if (key == "label") labels = {std::stoll(v)};
    else if (key == "sample_index") o.sample_index = {0, 1};   // two for one label
    else if (!set_option(o, key, v)) { std::cerr << "unknown option " << key << "\n"; return 3; }
    p.generate(labels, o);
  } catch (const bigr::Error& e) {
    std::cout << "error: " << e.what() << "\n";
    return 0;
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: pipeline-checks concurrent|weights|error|info|text|tokenize|encode MODEL_DIR ...\n";
    return 3;
  }
  const std::string mode = argv[1];
  const bigr::Pipeline p = bigr::Pipeline::load(argv[2]);
  if (mode == "concurrent" && argc == 4) {
    at::set_num_threads(1);   // the threads are the callers'; one intra-op thread each keeps a 2-core machine sane
    return concurrent(p, std::stoi(argv[3]));
  }
  if (mode == "weights" && argc == 5) return weights(p, argv[3], std::stoll(argv[4]));
  if (mode == "error" && argc == 5) return error(p, argv[3], argv[4]);
  if (mode == "text" && argc >= 5) {
    const bool split = argc >= 6 && std::string(argv[5]) == "split=1";
    return text(p, argv[3], argv[4], split, parse_options(argc, argv, split ? 6 : 5));
  }
  if (mode == "tokenize" && argc == 6) {
    const bigr::TextTokens t = p.tokenize(read_prompts(argv[3]));
    write_npy(argv[4], t.ids.cpu().contiguous(), "<i8");
    write_npy(argv[5], t.mask.cpu().to(at::kByte).contiguous(), "|u1");
    return 0;
  }
  if (mode == "encode" && argc == 5) {
    write_npy(argv[4], p.encode_text(read_prompts(argv[3])).embeddings.cpu().contiguous(), "<f4");
    return 0;
  }
  if (mode == "info" && argc == 3) {
    const bigr::ModelInfo& i = p.info();
    std::cout << "kind=" << i.kind << "\ntext_tokens=" << i.text_tokens << "\ntext_dim=" << i.text_dim
              << "\ntext_encoder=" << i.text_encoder << "\nencodes_prompts=" << i.encodes_prompts
              << "\nnum_tokens=" << i.num_tokens << "\n";
    return 0;
  }
  std::cerr << "bad arguments for " << mode << "\n";
  return 3;
}
