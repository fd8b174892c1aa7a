// bigr-latency MODEL_DIR BATCH REPEATS THREADS CODES.npy [DEVICE]: times Pipeline::generate of BATCH images (classes
// 0, 1, ... mod C, seed 0, the model's settings) REPEATS times after one untimed warm-up call, and writes the warm-up's
// codes (for bench/cpp.py to compare with Python's). Every timed call ends with the codes on the host (on a GPU that
// waits for the device). Prints one line: {"seconds": [...]}.
#include <ATen/Parallel.h>
#include <bigr/pipeline.h>

#include <chrono>
#include <fstream>
#include <iostream>

#include "image_files.h"

int main(int argc, char** argv) {
  if (argc < 6) {
    std::cerr << "usage: bigr-latency MODEL_DIR BATCH REPEATS THREADS CODES.npy [DEVICE]\n";
    return 2;
  }
  at::set_num_threads(std::stoi(argv[4]));
  bigr::LoadOptions load;
  if (argc > 6) load.device = argv[6];
  const bigr::Pipeline p = bigr::Pipeline::load(argv[1], load);
  const int64_t batch = std::stoll(argv[2]), repeats = std::stoll(argv[3]);
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < batch; ++i) labels.push_back(i % p.info().num_classes);
  bigr::GenerateOptions o;
  o.seed = 0;
  const at::Tensor codes = p.generate(labels, o).cpu().contiguous();
  std::ofstream(argv[5], std::ios::binary) << npy_bytes(codes.data_ptr<uint8_t>(), {codes.size(0), codes.size(1), codes.size(2)});
  std::cout << "{\"seconds\": [";
  for (int64_t r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    p.generate(labels, o).cpu();
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    std::cout << (r ? ", " : "") << dt.count();
  }
  std::cout << "]}\n";
  return 0;
}
