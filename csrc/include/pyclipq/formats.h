// The C++ mirror of docs/FORMATS.md (the spec) and pyclipq/formats.py.
// Torch-free: kernels include this and nothing else from pyclipq.
#pragma once
#include <cstdint>

namespace pyclipq {

inline constexpr int kFormatVersion = 1;
inline constexpr int64_t kKBlock = 128;       // K is zero-padded to a multiple of this
inline constexpr int64_t kVectorBytes = 32;   // block-planar packing unit
inline constexpr int kActQmax = 127;          // symmetric int8 activations in [-127, 127]
// A dynamic row whose absmax is below this quantizes to zero codes (docs/FORMATS.md, "Activations").
inline constexpr float kActMinAbsmax = 0x1p-100f;
inline constexpr int kTritsPerByte = 5;       // ternary storage layout: base 3
inline constexpr int kMaxTritByte = 242;      // 3^kTritsPerByte - 1, the largest byte of that layout

// Tile layout (a backend compute layout, never in checkpoints): weights in VNNI-4 tiles of
// kTileK K x kTileColumns columns, the B operand of one AMX tdpbssd.
inline constexpr int64_t kTileColumns = 16;
inline constexpr int64_t kTileK = 64;
inline constexpr int64_t kTileCodes = kTileColumns * kTileK;

enum class WeightKind : int { Int8 = 0, Int4 = 1, Int2 = 2, Ternary = 3 };

struct FormatTraits {
  int bits;
  int level_mul;     // level(c) = level_mul * c - level_offset
  int level_offset;
  int pad_code;
  int max_code;
  const char* name;
};

inline constexpr FormatTraits kTraits[] = {
    {8, 1, 0, 0, 127, "int8"},
    {4, 1, 8, 8, 15, "int4"},
    {2, 2, 3, 1, 3, "int2"},
    {2, 1, 1, 1, 2, "ternary"},
};

constexpr const FormatTraits& traits(WeightKind kind) { return kTraits[static_cast<int>(kind)]; }
constexpr int codes_per_byte(WeightKind kind) { return 8 / traits(kind).bits; }
constexpr int64_t padded_k(int64_t k) { return (k + kKBlock - 1) / kKBlock * kKBlock; }
// group_size 0 = one group per output channel (over the padded row)
constexpr int64_t num_groups(int64_t k_pad, int64_t group_size) { return group_size == 0 ? 1 : k_pad / group_size; }
constexpr int64_t tile_panels(int64_t n) { return (n + kTileColumns - 1) / kTileColumns; }
constexpr bool valid_group_size(int64_t g) { return g == 0 || g == 32 || g == 64 || g == 128; }

}  // namespace pyclipq
