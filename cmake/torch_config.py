"""Print the installed torch's build settings as CMake `set()` lines (read by CMakeLists.txt)."""
import torch
from torch.utils import cpp_extension


def cmake_list(items):
    return ";".join(str(i) for i in items)


print(f'set(TORCH_VERSION "{torch.__version__}")')
print(f'set(TORCH_CUDA_VERSION "{torch.version.cuda or ""}")')
print(f'set(TORCH_INCLUDE_DIRS "{cmake_list(cpp_extension.include_paths())}")')
print(f'set(TORCH_LIBRARY_DIRS "{cmake_list(cpp_extension.library_paths())}")')
print(f"set(TORCH_CXX11_ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})")
