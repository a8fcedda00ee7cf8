// The Python module pyclipq._C: importing it registers the kernels (TORCH_LIBRARY_IMPL
// blocks in csrc/cpu and csrc/cuda) and exposes what the build contains.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "pyclipq/backend_limits.h"
#include "pyclipq/cpu_kernels.h"
#include "pyclipq/formats.h"

namespace py = pybind11;

namespace {

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyclipq compiled kernels";
  m.def("torch_version", [] { return std::string(PYCLIPQ_TORCH_VERSION); });
  m.def("cpu_isa", [] { return std::string(pyclipq::cpu::active_kernels().isa); });
  // The C++ side of the format table (include/pyclipq/formats.h), for the parity test with
  // pyclipq/formats.py: one definition of each format, checked on both sides.
  m.def("format_traits", [] {
    py::dict formats;
    for (const pyclipq::FormatTraits& t : pyclipq::kTraits) {
      py::dict d;
      d["bits"] = t.bits;
      d["level_mul"] = t.level_mul;
      d["level_offset"] = t.level_offset;
      d["pad_code"] = t.pad_code;
      d["max_code"] = t.max_code;
      formats[t.name] = d;
    }
    py::dict constants;
    constants["format_version"] = pyclipq::kFormatVersion;
    constants["k_block"] = pyclipq::kKBlock;
    constants["vector_bytes"] = pyclipq::kVectorBytes;
    constants["act_qmax"] = pyclipq::kActQmax;
    constants["act_min_absmax"] = pyclipq::kActMinAbsmax;
    constants["trits_per_byte"] = pyclipq::kTritsPerByte;
    constants["max_trit_byte"] = pyclipq::kMaxTritByte;
    constants["tile_columns"] = pyclipq::kTileColumns;
    constants["tile_k"] = pyclipq::kTileK;
    py::dict out;
    out["formats"] = formats;
    out["constants"] = constants;
    return out;
  });
  m.def("backend_limits", [] {
    py::dict d;
    d["gemv_max_m"] = pyclipq::kGemvMaxM;
    return d;
  });
  m.def("build_info", [] {
    py::dict d;
    d["pyclipq_format_version"] = pyclipq::kFormatVersion;
    d["torch_built_against"] = std::string(PYCLIPQ_TORCH_VERSION);
    d["cpu_isa_variants"] = split_csv(PYCLIPQ_ISA_VARIANTS);
    d["cpu_isa"] = std::string(pyclipq::cpu::active_kernels().isa);
    d["cpu_isa_supported"] = pyclipq::cpu::supported_isas();
    d["cpu_isa_reason"] = std::string(pyclipq::cpu::cpu_isa_reason());
    {  // the formats whose fused linears read a tile-layout weight on this table
      py::list kinds;
      for (size_t k = 0; k < std::size(pyclipq::kTraits); ++k)
        if (pyclipq::cpu::active_kernels().reads_tile_layout(static_cast<pyclipq::WeightKind>(k)))
          kinds.append(pyclipq::kTraits[k].name);
      d["cpu_tile_layout"] = kinds;
    }
    d["cpu_threads"] = pyclipq::cpu::parallel_width();
#ifdef PYCLIPQ_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    return d;
  });
}
