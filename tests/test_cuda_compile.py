"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90a (CI has nvcc but no GPU).

Skipped when nvcc is not on PATH (or CUDA_HOME/bin). Each file is compiled once with
both targets (-gencode twice), with the flags CMakeLists.txt uses, and the object must
hold machine code for both (cuobjdump, when present).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90a")


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def torch_flags():
    import torch
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    return flags + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                    "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


def test_there_are_cuda_sources():
    names = {p.name for p in SOURCES}
    assert {"ops_cuda.cu", "gemm.cu", "gemv.cu", "quantize.cu", "pack.cu"} <= names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90a(source, tmp_path):
    obj = tmp_path / (source.stem + ".o")
    cmd = [NVCC, "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "--threads", "2",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", "-c", str(source), "-o", str(obj)]
    for arch in ARCHS:
        cmd += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    text = source.read_text()
    uses_torch = "ATen" in text or "torch/" in text
    if uses_torch:
        cmd += torch_flags()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"nvcc failed for {source.name}:\n{r.stderr[-4000:]}"
    if not uses_torch:  # our own kernels compile warning-free (torch's headers are not ours)
        assert "warning" not in r.stderr.lower(), r.stderr[-4000:]
    cuobjdump = shutil.which("cuobjdump") or str(Path(NVCC).parent / "cuobjdump")
    if not Path(cuobjdump).exists():  # triton wheels bundle one
        try:
            import triton.backends.nvidia as nv
            cuobjdump = str(Path(nv.__file__).parent / "bin" / "cuobjdump")
        except ImportError:
            pass
    if Path(cuobjdump).exists() and "<<<" in text:  # files that launch kernels carry machine code
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
        for arch in ARCHS:
            assert f"sm_{arch}" in listing, f"{source.name}: no sm_{arch} code in\n{listing}"
