"""Per-sentence cosine to fp32 of a packed MiniLM (bench_distill_real --out): where does it lose?"""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main/benchmarks")
import pyclipq
from pyclipq.cli.loading import load_model
from bench_distill_real import minilm_path, evaluation_sentences
from text_corpus import QUESTIONS
torch.set_num_threads(2)
loaded = load_model(f"hf:{minilm_path()}")
teacher = loaded.model
student = pyclipq.load(sys.argv[1], load_model(f"hf:{minilm_path()}").model)
sents = evaluation_sentences()
def emb(m):
    with torch.no_grad():
        return torch.cat([F.normalize(m.encode_text(loaded.tokenize(sents[i:i+100])).float(), dim=-1) for i in range(0, len(sents), 100)])
cos = (emb(teacher) * emb(student)).sum(-1)
qs = {s for p in QUESTIONS for s in p}
isq = torch.tensor([s in qs for s in sents])
ntok = torch.tensor([int((loaded.tokenize([s]) != 0).sum()) for s in sents])
print(f"mean {cos.mean():.4f}; questions ({int(isq.sum())}) {cos[isq].mean():.4f}; statements {cos[~isq].mean():.4f}")
for lo, hi in ((0, 16), (16, 20), (20, 24), (24, 99)):
    m = (ntok >= lo) & (ntok < hi)
    if m.any(): print(f"tokens {lo}-{hi}: n={int(m.sum())} cos {cos[m].mean():.4f}")
order = cos.argsort()
for i in order[:12]:
    print(f"{cos[i]:.4f} {sents[i]}")
print("best:")
for i in order[-5:]:
    print(f"{cos[i]:.4f} {sents[i]}")
