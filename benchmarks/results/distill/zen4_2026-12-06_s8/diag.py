"""Diagnostic: cosine to fp32 on the evaluation pairs, on training texts, and on unseen texts of the training distribution."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main/benchmarks")
import bench_distill_real as b
from train_texts import mixed_texts

class DiagEvaluation(b.Evaluation):
    def __init__(self, loaded, pairs=200):
        super().__init__(loaded, pairs)
        train = mixed_texts(20000, 0, b.DEFAULT_CORPORA)
        more = [t for t in mixed_texts(26000, 1, b.DEFAULT_CORPORA) if t not in set(train) and t not in self.sentences]
        self.extra = {}
        for name, texts in (("train", train[:400]), ("unseen", more[:400])):
            batches = [loaded.tokenize(texts[i:i + 100]) for i in range(0, 400, 100)]
            ref = torch.cat([F.normalize(loaded.model.encode_text(t).float(), dim=-1) for t in batches])
            self.extra[name] = (batches, ref)

    def __call__(self, model):
        record = super().__call__(model)
        with torch.no_grad():
            for name, (batches, ref) in self.extra.items():
                emb = torch.cat([F.normalize(model.encode_text(t).float(), dim=-1) for t in batches])
                record["cos_" + name] = round(float((emb * ref).sum(-1).mean()), 5)
        print("   ", {k: v for k, v in record.items() if k.startswith("cos")}, flush=True)
        return record

b.Evaluation = DiagEvaluation
raise SystemExit(b.main(sys.argv[1:]))
