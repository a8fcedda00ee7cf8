import sys, torch, torch.nn.functional as F, numpy as np
sys.path.insert(0, "/work/main/benchmarks")
import bench_distill_real as b
from text_corpus import evaluation_pairs
from train_texts import mixed_texts
import pyclipq
from pyclipq.cli.loading import load_model
torch.set_num_threads(2)
path = b.minilm_path()
loaded = load_model(f"hf:{path}")
student = pyclipq.load(sys.argv[1], load_model(f"hf:{path}").model)
ev = [a for a, _ in evaluation_pairs(200)] + [c for _, c in evaluation_pairs(200)]
seen = set(mixed_texts(20000, 0, b.DEFAULT_CORPORA))
tr = [t for t in mixed_texts(26000, 1, b.DEFAULT_CORPORA) if t not in seen][:2000]
# joined: two unseen texts as one
jn = [tr[i] + " " + tr[i + 1] for i in range(0, 800, 2)]
def cos_len(texts):
    out = []
    for i in range(0, len(texts), 100):
        t = loaded.tokenize(texts[i:i+100])
        with torch.no_grad():
            a = F.normalize(loaded.model.encode_text(t).float(), dim=-1); s = F.normalize(student.encode_text(t).float(), dim=-1)
        out.append((a * s).sum(-1))
    c = torch.cat(out).numpy()
    l = np.array([len(loaded.tokenize([x])["input_ids"][0]) if isinstance(loaded.tokenize([x]), dict) else 0 for x in texts[:0]])
    return c
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
for name, texts in (("eval", ev), ("unseen", tr), ("joined", jn)):
    c = cos_len(texts); l = np.array([len(tok(x)["input_ids"]) for x in texts])
    print(name, "mean %.4f" % c.mean(), " ".join("[%d-%d) %.4f n=%d" % (lo, hi, c[(l >= lo) & (l < hi)].mean(), ((l >= lo) & (l < hi)).sum())
                                           for lo, hi in ((0, 12), (12, 16), (16, 20), (20, 24), (24, 30), (30, 80)) if ((l >= lo) & (l < hi)).sum()))
