import sys, copy, warnings, argparse
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # benchmarks/
warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import bench_distill_real as B, pyclipq
from pyclipq.cli.loading import load_model
from train_texts import mixed_texts
loaded = load_model(f"hf:{B.minilm_path()}")
packed = pyclipq.load(sys.argv[1], copy.deepcopy(loaded.model))
texts = mixed_texts(20000, 0, list(B.DEFAULT_CORPORA))
ns = argparse.Namespace(texts=20000, seed=0, corpus=list(B.DEFAULT_CORPORA))
dom = B.domain_texts(texts, ns, set(B.evaluation_sentences()))
def cos(model_a, model_b, sents):
    out=[]
    for i in range(0,len(sents),100):
        tok = loaded.tokenize(sents[i:i+100])
        with torch.no_grad():
            a = F.normalize(model_a.encode_text(tok).float(), dim=-1); b = F.normalize(model_b.encode_text(tok).float(), dim=-1)
        out.append((a*b).sum(-1))
    return torch.cat(out)
for name, sents in [("eval", B.evaluation_sentences()), ("held", dom["held_out_texts"])]:
    c = cos(packed, loaded.model, sents)
    lens = torch.tensor([len(loaded.tokenize([s])[0].nonzero()) if False else len(s.split()) for s in sents])
    print(name, "mean", round(float(c.mean()),5))
    for lo, hi in [(0,8),(8,12),(12,16),(16,20),(20,25),(25,60)]:
        m = (lens>=lo)&(lens<hi)
        if m.sum(): print(f"  words {lo}-{hi}: n={int(m.sum())} cos {float(c[m].mean()):.5f}")
    worst = torch.argsort(c)[:5]
    for i in worst.tolist(): print("   worst", round(float(c[i]),4), sents[i])
