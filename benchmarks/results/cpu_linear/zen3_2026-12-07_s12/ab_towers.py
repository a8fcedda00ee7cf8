# Tower A/B on the AVX2 table: PQ_AB_WHOLE_M unset (base) or set (change), alternating child processes.
import json, os, subprocess, sys
CHILD = r'''
import json, time, torch, open_clip, pyclipq, logging
logging.disable(logging.WARNING)
torch.set_num_threads(2)
model = open_clip.create_model("ViT-B-32").eval()
q = pyclipq.convert(model, "int8").eval()
img = torch.randn(1, 3, 224, 224); txt = torch.randint(1, 49000, (1, 77))
out = {}
with torch.inference_mode():
    for name, f in (("image@1", lambda: q.encode_image(img)), ("text@1", lambda: q.encode_text(txt))):
        for _ in range(3): f()
        ts = []
        for _ in range(15):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        out[name] = sorted(ts)[len(ts) // 2]
print(json.dumps(out))
'''
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
res = {"base": [], "change": []}
for r in range(runs):
    for label in ("base", "change"):
        env = dict(os.environ, PYCLIPQ_CPU_ISA="avx2")
        if label == "change": env["PQ_AB_WHOLE_M"] = "128"
        o = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
        res[label].append(json.loads(o.stdout.strip().splitlines()[-1]))
        print(label, res[label][-1], flush=True)
for case in res["base"][0]:
    b = min(d[case] for d in res["base"]); c = min(d[case] for d in res["change"])
    print(f"{case}: base {b*1e3:.1f} ms, change {c*1e3:.1f} ms (best medians of {runs} runs), speedup {b/c:.3f}")
