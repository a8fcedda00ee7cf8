// Packing kernels (load-time work): block-planar 2/4-bit codes and base-3 trits.
// One thread per output byte (pack) or per output code (unpack); exact integer math.
#include "device_utils.cuh"

namespace pyclipq::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void pack_codes_kernel(const uint8_t* codes, uint8_t* out, int64_t total_bytes, int64_t k_pad, int bits) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (i >= total_bytes) return;
  const int per = 8 / bits;
  const int64_t row_bytes = k_pad / per;
  const int64_t r = i / row_bytes, byte = i % row_bytes;
  const int64_t block = byte / 32, j = byte % 32;
  const uint8_t* src = codes + r * k_pad + block * 32 * per + j;
  unsigned v = 0;
  for (int p = 0; p < per; ++p) v |= static_cast<unsigned>(src[p * 32]) << (p * bits);
  out[i] = static_cast<uint8_t>(v);
}

__global__ void unpack_codes_kernel(const uint8_t* packed, uint8_t* out, int64_t total, int64_t k_pad, int bits) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (i >= total) return;
  const int per = 8 / bits;
  const int64_t r = i / k_pad, k = i % k_pad;
  const int64_t block = k / (32 * per), p = (k / 32) % per, j = k % 32;
  out[i] = (packed[r * (k_pad / per) + block * 32 + j] >> (p * bits)) & ((1 << bits) - 1);
}

__global__ void pack_trits_kernel(const uint8_t* codes, uint8_t* out, int64_t total, int64_t width, int64_t k,
                                  int pad_code) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (i >= total) return;
  const int64_t n_bytes = (k + 4) / 5;
  const int64_t r = i / n_bytes, j = i % n_bytes;
  int v = 0;
  for (int t = 4; t >= 0; --t) {  // Horner: byte = sum_t c[5j + t] 3^t
    const int64_t idx = j * 5 + t;
    v = v * 3 + (idx < k ? codes[r * width + idx] : pad_code);
  }
  out[i] = static_cast<uint8_t>(v);
}

__global__ void unpack_trits_kernel(const uint8_t* packed, uint8_t* out, int64_t total, int64_t k, int64_t k_pad,
                                    int pad_code) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (i >= total) return;
  const int64_t n_bytes = (k + 4) / 5;
  const int64_t r = i / k_pad, c = i % k_pad;
  if (c >= k) {
    out[i] = static_cast<uint8_t>(pad_code);
    return;
  }
  int v = packed[r * n_bytes + c / 5];
  for (int t = 0; t < c % 5; ++t) v /= 3;
  out[i] = static_cast<uint8_t>(v % 3);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

void launch_pack_codes(const uint8_t* codes, uint8_t* out, int64_t n, int64_t k_pad, int bits, cudaStream_t stream) {
  const int64_t total = n * k_pad * bits / 8;
  if (total) pack_codes_kernel<<<blocks_for(total), kThreads, 0, stream>>>(codes, out, total, k_pad, bits);
}

void launch_unpack_codes(const uint8_t* packed, uint8_t* out, int64_t n, int64_t k_pad, int bits,
                         cudaStream_t stream) {
  const int64_t total = n * k_pad;
  if (total) unpack_codes_kernel<<<blocks_for(total), kThreads, 0, stream>>>(packed, out, total, k_pad, bits);
}

void launch_pack_trits(const uint8_t* codes, uint8_t* out, int64_t n, int64_t width, int64_t k, int pad_code,
                       cudaStream_t stream) {
  const int64_t total = n * ((k + 4) / 5);
  if (total) pack_trits_kernel<<<blocks_for(total), kThreads, 0, stream>>>(codes, out, total, width, k, pad_code);
}

void launch_unpack_trits(const uint8_t* packed, uint8_t* out, int64_t n, int64_t k, int64_t k_pad, int pad_code,
                         cudaStream_t stream) {
  const int64_t total = n * k_pad;
  if (total) unpack_trits_kernel<<<blocks_for(total), kThreads, 0, stream>>>(packed, out, total, k, k_pad, pad_code);
}

}  // namespace pyclipq::cuda
