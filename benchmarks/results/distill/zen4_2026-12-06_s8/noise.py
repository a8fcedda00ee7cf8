"""diag.py with random-token noise on the training batches: a fraction of the regular tokens replaced by random vocabulary tokens."""
import os, sys, torch
sys.path.insert(0, "/tmp/diag"); sys.path.insert(0, "/work/main/benchmarks")
import bench_distill_real as b
P = float(os.environ.get("NOISE", "0.15"))
class NoisyCollate(b.TextCollate):
    gen = torch.Generator().manual_seed(0)
    def __call__(self, texts):
        out = super().__call__(texts)
        ids = out["tokens"].clone()
        mask = (ids >= 999) & (torch.rand(ids.shape, generator=self.gen) < P)
        ids[mask] = torch.randint(999, 30522, (int(mask.sum()),), generator=self.gen)
        return {"tokens": ids}
b.TextCollate = NoisyCollate
sys.argv = [sys.argv[0]] + sys.argv[1:]
exec(open("/tmp/diag/diag.py").read().replace("import bench_distill_real as b", "").replace('sys.path.insert(0, "/work/main/benchmarks")', ""))
