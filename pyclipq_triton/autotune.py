"""Launch configurations: autotuned per bucket of M, or fixed.

**Buckets.** The GEMMs are tuned once per ``(M bucket, N, K, format)``, not per M: a new
batch size that lands in a known bucket reuses the tuned config instead of retuning.
Each bucket has its own short candidate list (tiny-M tiles for GEMV-like shapes,
wgmma-sized tiles for large M), so tuning stays cheap.

**Fixed configs**, for tests and reproducible benchmarks, in order of precedence:

1. a ``config=`` argument of the host functions in ``pyclipq/ops/triton.py``;
2. the :func:`use_config` context manager (also applies to the registered ops);
3. the environment variable ``PYCLIPQ_TRITON_CONFIG``, e.g.
   ``"int8_gemm:BLOCK_M=128,BLOCK_N=128,BLOCK_K=128,num_warps=8,num_stages=3;lowbit_gemm:BLOCK_M=64"``
   (``kernel:`` prefixes are optional: an entry without one applies to every kernel).

A fixed config fills in what it names over the bucket's first candidate; names a kernel
has no parameter for are dropped for that kernel (so one unprefixed entry can serve every
kernel that has the parameter). Under the
Triton interpreter (``TRITON_INTERPRET=1``) nothing is timed: the first candidate (or
the fixed config) is used.
"""
import contextlib
import inspect
import os

import triton

ENV_VAR = "PYCLIPQ_TRITON_CONFIG"
M_BUCKETS = (16, 64, 256, 1024, 4096, 1 << 62)
LAUNCH_KEYS = ("num_warps", "num_stages")


def m_bucket(m: int) -> int:
    """The upper bound of M's bucket: tuned configs are shared by every M in a bucket."""
    for bound in M_BUCKETS:
        if m <= bound:
            return bound
    return M_BUCKETS[-1]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _cfg(num_warps, num_stages, **meta):
    return dict(meta, num_warps=num_warps, num_stages=num_stages)


# Candidates per kernel and M bucket (H100-minded; any CUDA GPU runs them). BLOCK_M >= 64
# with 4 warps per warpgroup lets Triton emit wgmma on sm_90; below that it uses mma.
CANDIDATES = {
    "int8_gemm": {
        16: [_cfg(4, 5, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
             _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1),
             _cfg(2, 6, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1)],
        64: [_cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
             _cfg(4, 5, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
             _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=1)],
        256: [_cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
              _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
              _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)],
        1024: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
               _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
               _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)],
        4096: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8),
               _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
               _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)],
        M_BUCKETS[-1]: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8),
                        _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
                        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)],
    },
    "lowbit_gemm": {
        16: [_cfg(4, 4, BLOCK_M=16, BLOCK_N=64, GROUP_M=1),
             _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, GROUP_M=1),
             _cfg(4, 3, BLOCK_M=16, BLOCK_N=128, GROUP_M=1)],
        64: [_cfg(4, 4, BLOCK_M=64, BLOCK_N=64, GROUP_M=1),
             _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, GROUP_M=1),
             _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, GROUP_M=1)],
        256: [_cfg(4, 3, BLOCK_M=64, BLOCK_N=128, GROUP_M=8),
              _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8),
              _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, GROUP_M=8)],
        1024: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8),
               _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, GROUP_M=8),
               _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, GROUP_M=8)],
        4096: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8),
               _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, GROUP_M=8),
               _cfg(4, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8)],
        M_BUCKETS[-1]: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=256, GROUP_M=8),
                        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8),
                        _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, GROUP_M=8)],
    },
}

# Kernels launched with a heuristic (no timing): memory-bound, where the right shape follows
# from the problem size. Their bucket lists hold one entry each; fixed configs still apply.
HEURISTIC = {
    "quantize": {b: [_cfg(4, 1, BLOCK_M=1, BLOCK_K=1024)] for b in M_BUCKETS},
    "weight_only": {b: [_cfg(4, 3, BLOCK_M=16, BLOCK_N=32, SPLIT_K=1)] for b in M_BUCKETS},
}

_override_stack = []


def _quick_bench(fn, quantiles=None, **_):
    # Short timing per candidate: tuning runs once per (bucket, shape), and a few hundred
    # shapes x 3 candidates at Triton's default 125 ms each would take minutes.
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotune(configs, key):
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        return triton.autotune(configs=configs, key=key, do_bench=_quick_bench)
    return triton.autotune(configs=configs, key=key, warmup=5, rep=25)


def parse_config(text: str, kernel: str) -> dict:
    """The entries of a ``PYCLIPQ_TRITON_CONFIG``-style string that apply to ``kernel``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, body = part.rpartition(":")
        if name and name.strip() != kernel:
            continue
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{ENV_VAR}: expected KEY=VALUE, got {item!r} in {text!r}")
            out[key.strip()] = int(value)
    return out


@contextlib.contextmanager
def use_config(kernel: str | None = None, **config):
    """Run the kernels inside the block with a fixed config (``kernel=None``: every kernel)."""
    _override_stack.append((kernel, config))
    try:
        yield
    finally:
        _override_stack.pop()


def fixed_config(kernel: str, config: dict | None = None) -> dict | None:
    """The fixed config for this launch, or None (then tune, or use the heuristic)."""
    found = {}
    env = os.environ.get(ENV_VAR)
    if env:
        found.update(parse_config(env, kernel))
    for name, cfg in _override_stack:
        if name is None or name == kernel:
            found.update(cfg)
    if config:
        found.update(config)
    return found or None


def candidates(kernel: str, m: int) -> list:
    table = CANDIDATES.get(kernel) or HEURISTIC[kernel]
    return table[m_bucket(m)]


def accepted(fn, meta: dict) -> dict:
    """The entries of ``meta`` that ``fn`` (a @triton.jit kernel) takes, plus the launch options.

    A compiled kernel rejects unknown keyword arguments (the interpreter ignores them).
    """
    names = set(getattr(fn, "arg_names", ())) | set(LAUNCH_KEYS)
    return {k: v for k, v in meta.items() if k in names}


class BucketedKernel:
    """A ``@triton.jit`` kernel plus one ``triton.autotune`` wrapper per M bucket.

    ``select(m, config)`` returns ``(kernel, meta)``: the object to launch (a JITFunction
    or an Autotuner, both accepted by ``torch.library.wrap_triton``) and the
    keyword arguments the launch must add (a fixed config's meta-parameters and
    ``num_warps``/``num_stages``; empty when the Autotuner chooses).
    """

    def __init__(self, name: str, fn, key: list):
        self.name = name
        self.fn = fn
        self.key = key
        self._tuners = {}

    def _tuner(self, bucket):
        if bucket not in self._tuners:
            configs = [triton.Config({k: v for k, v in c.items() if k not in LAUNCH_KEYS},
                                     num_warps=c["num_warps"], num_stages=c["num_stages"])
                       for c in CANDIDATES[self.name][bucket]]
            self._tuners[bucket] = _autotune(configs, self.key)(self.fn)
        return self._tuners[bucket]

    def select(self, m: int, config: dict | None = None):
        fixed = fixed_config(self.name, config)
        if fixed is None and self.name in CANDIDATES and not interpreting():
            return self._tuner(m_bucket(m)), {}
        return self.fn, accepted(self.fn, {**candidates(self.name, m)[0], **(fixed or {})})
