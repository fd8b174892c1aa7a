// PNG and .npy writers for the example, without dependencies: PNGs are stored uncompressed (deflate "stored" blocks),
// which every reader accepts; the .npy header is NumPy's format version 1.0.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// rgb: height * width * channels bytes (channels 1 or 3), row-major.
std::string png_bytes(const uint8_t* pixels, int64_t height, int64_t width, int64_t channels);
// A uint8 array of `shape`, C order.
std::string npy_bytes(const uint8_t* data, const std::vector<int64_t>& shape);
