// pipeline-checks MODE MODEL_DIR ...: one check of the C++ API per call (python_tests/cpp/test_cpp_api.py).
//   concurrent DIR THREADS          every call of a set, from THREADS threads at once, equals the same call made alone
//   weights DIR OUT.npy SEED        codes of three class-weight rows (a one-hot row, a 50/50 mix, a 3-way mix)
//   error DIR OPTION VALUE          prints the bigr::Error message of one bad input ("error: ..."), exit 0 if thrown
#include <ATen/Parallel.h>
#include <bigr/pipeline.h>

#include <atomic>
#include <fstream>
#include <iostream>
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
  try {
    if (key == "cfg") o.cfg = std::stod(v);
    else if (key == "gumbel") o.gumbel = std::stod(v);
    else if (key == "temperature") o.temperature = std::stod(v);
    else if (key == "iters") o.iters = std::stoll(v);
    else if (key == "steps") o.steps = std::stoll(v);
    else if (key == "seed") o.seed = std::stoll(v);
    else if (key == "cfg_schedule") o.cfg_schedule = v;
    else if (key == "gumbel_schedule") o.gumbel_schedule = v;
    else if (key == "label") labels = {std::stoll(v)};
    else if (key == "sample_index") o.sample_index = {0, 1};   // two for one label
    else if (key == "class_name") { p.generate(std::vector<std::string>{v}, o); return 1; }
    else if (key == "weights") { p.generate(at::zeros({2, std::stoll(v)}, at::kFloat), o); return 1; }
    else if (key == "decode") { p.decode(at::zeros({1, std::stoll(v), p.info().bits}, at::kByte)); return 1; }
    else { std::cerr << "unknown option " << key << "\n"; return 3; }
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
    std::cerr << "usage: pipeline-checks concurrent|weights|error MODEL_DIR ...\n";
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
  std::cerr << "bad arguments for " << mode << "\n";
  return 3;
}
