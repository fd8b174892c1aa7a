// bigr-generate: images of the given classes, or of prompts for a text model, from a model directory written by
// `bigr export cpp` (`bigr export cpp --text` for the bundled text model).
//
//   bigr-generate --model DIR --classes 0,1,Sneaker [--per-class N] [--seed S] [--greedy] [--cfg X] ... --out OUT
//                 [--codes-out CODES.npy]
//   bigr-generate --model TEXT_DIR --prompt "a red sneaker" [--prompt "a bag" ...] ... --out OUT
//
// Writes OUT/00000_<class>.png, ... (the names and pixels of `bigr generate`), or for prompts OUT/00000_p<j>.png, ...
// (j: the prompt's position) and OUT/prompts.txt ("p<j>\t<prompt>" lines), as `bigr generate --prompt` does; with
// --codes-out, the codes as a uint8 .npy of shape (B, N, K). Exit status 0 on success, 2 for bad arguments or a missing/corrupt model directory,
// 1 for any other failure; files appear only once everything succeeded.
#include <ATen/Parallel.h>
#include <bigr/pipeline.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "image_files.h"

namespace fs = std::filesystem;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: bigr-generate --model DIR (--classes C[,C...] | --prompt TEXT [--prompt TEXT ...]) --out DIR\n"
    "                     [--per-class N] [--batch-size N] [--seed S]\n"
    "                     [--cfg X] [--iters N] [--steps N] [--gumbel X] [--cfg-schedule constant|linear]\n"
    "                     [--gumbel-schedule constant|down|up] [--temperature X] [--deterministic] [--greedy]\n"
    "                     [--threads N] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16]\n"
    "                     [--codes-out FILE.npy] [--no-verify]\n";

int64_t to_int(const std::string& flag, const std::string& v) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty()) throw UsageError(flag + " takes an integer, got '" + v + "'");
  return x;
}

double to_double(const std::string& flag, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty()) throw UsageError(flag + " takes a number, got '" + v + "'");
  return x;
}

void write_atomic(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path().empty() ? fs::path(".") : path.parent_path());
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw std::runtime_error("cannot write " + tmp.string());
  }
  fs::rename(tmp, path);
}

std::string pad5(int64_t i) {
  std::string s = std::to_string(i);
  return std::string(s.size() < 5 ? 5 - s.size() : 0, '0') + s;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  std::vector<std::string> prompts;   // --prompt, repeatable
  bigr::GenerateOptions opt;
  bigr::LoadOptions load;
  try {
    const std::vector<std::string> valued = {"--model", "--classes", "--out", "--per-class", "--batch-size", "--seed",
                                             "--cfg", "--iters", "--steps", "--gumbel", "--cfg-schedule",
                                             "--gumbel-schedule", "--temperature", "--threads", "--device",
                                             "--codes-out", "--dtype"};
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      }
      if (a == "--greedy" || a == "--deterministic" || a == "--no-verify") {
        args[a] = "1";
      } else if (a == "--prompt") {
        if (i + 1 >= argc) throw UsageError(a + " needs a value");
        prompts.push_back(argv[++i]);
      } else if (std::find(valued.begin(), valued.end(), a) != valued.end()) {
        if (i + 1 >= argc) throw UsageError(a + " needs a value");
        args[a] = argv[++i];
      } else {
        throw UsageError("unknown argument '" + a + "'");
      }
    }
    for (const char* need : {"--model", "--out"})
      if (!args.count(need)) throw UsageError(std::string("the argument ") + need + " is required");
    if ((args.count("--classes") > 0) == !prompts.empty())
      throw UsageError(prompts.empty() ? "one of --classes and --prompt is required"
                                       : "--prompt and --classes do not go together: a text model takes prompts, "
                                         "a class model classes");
    if (args.count("--seed")) opt.seed = to_int("--seed", args["--seed"]);
    if (args.count("--cfg")) opt.cfg = to_double("--cfg", args["--cfg"]);
    if (args.count("--iters")) opt.iters = to_int("--iters", args["--iters"]);
    if (args.count("--steps")) opt.steps = to_int("--steps", args["--steps"]);
    if (args.count("--gumbel")) opt.gumbel = to_double("--gumbel", args["--gumbel"]);
    if (args.count("--temperature")) opt.temperature = to_double("--temperature", args["--temperature"]);
    if (args.count("--cfg-schedule")) opt.cfg_schedule = args["--cfg-schedule"];
    if (args.count("--gumbel-schedule")) opt.gumbel_schedule = args["--gumbel-schedule"];
    if (args.count("--greedy")) opt.greedy = true;
    if (args.count("--deterministic")) opt.deterministic = true;
    if (args.count("--device")) load.device = args["--device"];
    if (args.count("--dtype")) opt.dtype = args["--dtype"];
    if (args.count("--no-verify")) load.verify = false;
    if (args.count("--threads")) {
      const int64_t t = to_int("--threads", args["--threads"]);
      if (t < 1) throw UsageError("--threads must be at least 1, got " + std::to_string(t));
      at::set_num_threads(static_cast<int>(t));
    }
  } catch (const UsageError& e) {
    std::cerr << kUsage << "error: " << e.what() << "\n";
    return 2;
  }

  bigr::Pipeline pipe = [&]() -> bigr::Pipeline {
    try {
      return bigr::Pipeline::load(args["--model"], load);
    } catch (const bigr::Error& e) {
      std::cerr << "error: " << e.what() << "\n";
      std::exit(2);
    }
  }();
  try {
    const bool text = !prompts.empty();
    if (!text && pipe.info().kind == "text")
      throw bigr::Error(args["--model"] + " is a text-to-image model: pass --prompt \"...\" instead of --classes");
    if (text && pipe.info().kind != "text")
      throw bigr::Error(args["--model"] + " is a class-conditional model: --prompt needs a text-to-image model "
                        "(export the bundled one with `bigr export cpp --text`)");
    const int64_t per_class = args.count("--per-class") ? to_int("--per-class", args["--per-class"]) : 1;
    const int64_t batch = args.count("--batch-size") ? to_int("--batch-size", args["--batch-size"]) : 16;
    if (per_class < 1 || batch < 1) throw bigr::Error("--per-class and --batch-size must be at least 1");
    // labels: class ids, or for prompts the prompt's position (its image names; the prompt itself is in `texts`)
    std::vector<int64_t> labels;
    std::vector<std::string> texts;
    if (text) {
      for (std::string& p : prompts) {   // stripped, as `bigr generate --prompt` does
        const char* ws = " \t\n\r\f\v\x1c\x1d\x1e\x1f";   // Python's str.strip() on ASCII
        const auto a = p.find_first_not_of(ws), b = p.find_last_not_of(ws);
        p = a == std::string::npos ? "" : p.substr(a, b - a + 1);
      }
      pipe.tokenize(prompts);   // a prompt the encoder cannot take (or no encoder) fails before any work
      for (size_t j = 0; j < prompts.size(); ++j)
        for (int64_t k = 0; k < per_class; ++k) labels.push_back(static_cast<int64_t>(j)), texts.push_back(prompts[j]);
    } else {
      std::vector<std::string> names;
      std::stringstream ss(args["--classes"]);
      for (std::string part; std::getline(ss, part, ',');)
        if (!part.empty()) names.push_back(part);
      if (names.empty()) throw bigr::Error("--classes needs at least one class id or name");
      const std::vector<int64_t> ids = pipe.class_ids(names);
      for (int64_t c : ids)
        if (c < 0 || c >= pipe.info().num_classes)
          throw bigr::Error("class id " + std::to_string(c) + " is out of range: this model has classes 0.." +
                            std::to_string(pipe.info().num_classes - 1) + "; pass ids in that range");
      for (int64_t c : ids)
        for (int64_t k = 0; k < per_class; ++k) labels.push_back(c);
    }
    pipe.resolve(opt);   // bad options fail before any work
    const bool images = pipe.info().image_size > 0;
    std::vector<at::Tensor> codes, pixels;
    const int64_t n = static_cast<int64_t>(labels.size());
    for (int64_t lo = 0; lo < n; lo += batch) {   // image i is keyed by (seed, i): the batch size changes nothing
      const int64_t hi = std::min(n, lo + batch);
      bigr::GenerateOptions o = opt;
      for (int64_t i = lo; i < hi; ++i) o.sample_index.push_back(i);
      at::Tensor c = text ? pipe.generate(std::vector<std::string>(texts.begin() + lo, texts.begin() + hi), o).cpu()
                          : pipe.generate(std::vector<int64_t>(labels.begin() + lo, labels.begin() + hi), o).cpu();
      if (images) pixels.push_back(pipe.decode(c).cpu());
      codes.push_back(c);
      std::cerr << "\rgenerate " << hi << "/" << n << std::flush;
    }
    std::cerr << "\n";
    const at::Tensor all = at::cat(codes).contiguous();
    const fs::path out(args["--out"]);
    if (images) {
      const at::Tensor px = at::cat(pixels).contiguous();
      for (int64_t i = 0; i < n; ++i) {
        const at::Tensor img = px[i].contiguous();
        write_atomic(out / (pad5(i) + "_" + (text ? "p" : "") + std::to_string(labels[i]) + ".png"),
                     png_bytes(img.data_ptr<uint8_t>(), img.size(0), img.size(1), img.size(2)));
      }
    } else {
      fs::create_directories(out);
    }
    if (text) {
      std::string lines;
      for (size_t j = 0; j < prompts.size(); ++j) lines += "p" + std::to_string(j) + "\t" + prompts[j] + "\n";
      write_atomic(out / "prompts.txt", lines);
    }
    if (args.count("--codes-out"))
      write_atomic(args["--codes-out"], npy_bytes(all.data_ptr<uint8_t>(), {all.size(0), all.size(1), all.size(2)}));
    std::cout << "wrote " << n << " image" << (n == 1 ? "" : "s") << " to " << out.string() << "/"
              << (args.count("--codes-out") ? " and the codes to " + args["--codes-out"] : "") << "\n";
    return 0;
  } catch (const UsageError& e) {
    std::cerr << kUsage << "error: " << e.what() << "\n";
    return 2;
  } catch (const bigr::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
