"""HF CLIPModel(CLIPConfig()) int8: q|k|v joined (the library's default now) against three projections, alternating calls."""
import statistics, sys, time, torch
from transformers import CLIPConfig, CLIPModel
import pyclipq
from pyclipq.nn import FusedBlock
threads, calls = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
model = pyclipq.convert(CLIPModel(CLIPConfig()).eval(), "int8").eval()
joined_projection = FusedBlock._joined_projection
g = torch.Generator().manual_seed(0)
print(f"transformers CLIPModel(CLIPConfig()) int8, {threads} threads, {pyclipq.build_info()['cpu_isa']} table")
with torch.inference_mode():
    for b in [int(v) for v in sys.argv[3:]]:
        x = torch.randn(b, 3, 224, 224, generator=g)
        tok = torch.randint(1, 49406, (b, 77), generator=g); tok[:, -1] = 49407
        for name, f in ((f"image@{b}", lambda: model.get_image_features(pixel_values=x)),
                        (f"text@{b}", lambda: model.get_text_features(input_ids=tok))):
            t = {"three": [], "joined": []}
            outs = {}
            for _ in range(calls + 1):
                for mode in t:
                    FusedBlock._joined_projection = joined_projection if mode == "joined" else (lambda self, p: None)
                    t0 = time.perf_counter(); o = f(); t[mode].append(time.perf_counter() - t0)
                    outs[mode] = getattr(o, "pooler_output", o)
            a, j = (statistics.median(v[1:]) * 1e3 for v in t.values())
            print(f"{name}: three projections {a:.1f} ms, joined {j:.1f} ms, {a / j:.3f}x, equal: {torch.equal(outs['three'], outs['joined'])}")
