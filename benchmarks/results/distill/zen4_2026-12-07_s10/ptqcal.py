"""int4 PTQ start (GPTQ + clip search, rotation 128) against the number of calibration texts."""
import sys, copy, torch
sys.path.insert(0, "/work/main/benchmarks")
torch.set_num_threads(1)
import pyclipq
from pyclipq.cli.loading import load_model
from pyclipq.train.recipes import ptq_start
from pyclipq.train.qat import prepare_qat
from bench_distill_real import minilm_path, Evaluation, text_batches, format_config, DEFAULT_CORPORA
from train_texts import mixed_texts
import argparse
args = argparse.Namespace(rotation="auto")
loaded = load_model(f"hf:{minilm_path()}")
ev = Evaluation(loaded)
texts = [t for t in mixed_texts(20000, 0, list(DEFAULT_CORPORA)) if t not in ev.sentences]
config = format_config("int4", args)
for batch, nb in [(16, 8), (16, 32), (16, 64)]:
    data = text_batches(loaded, texts, batch, 0)
    start = ptq_start(loaded.model, config, data, nb)
    student = prepare_qat(start, config, exact=False, learn_scales=True)
    print(batch * nb, "texts:", ev(student.eval()), flush=True)
