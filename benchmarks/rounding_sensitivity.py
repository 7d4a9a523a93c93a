"""LoRA-Pro AdamW from PEFT's B = 0 start: how far two runs drift apart when they differ only in how a batch is
summed (one batch of 8 against two halves accumulated), in float32 and float64, Sylvester X and X = 0.

    .venv/bin/python benchmarks/rounding_sensitivity.py
"""
import sys, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "tests"))
from models import tiny_peft, tiny_batch, tiny_loss
import lorapro
torch.set_num_threads(1)
def run(dtype, split, steps=6, lr=1e-3, x_mode="sylvester", init=True):
    model = tiny_peft(dtype=dtype, init_lora_weights=init)
    opt = lorapro.LoRAProAdamW(model, lr=lr, x_mode=x_mode)
    for s in range(steps):
        opt.zero_grad()
        b = tiny_batch(seed=s, n=8, dtype=dtype)
        if split:
            for h in (slice(0,4), slice(4,8)):
                (tiny_loss(model, tuple(t[h] for t in b)) / 2).backward()
        else:
            tiny_loss(model, b).backward()
        opt.step()
    return model, opt
for dtype in (torch.float32, torch.float64):
  for x_mode in ("sylvester","zero"):
    m1, o1 = run(dtype, False, x_mode=x_mode); m2, o2 = run(dtype, True, x_mode=x_mode)
    out=[]
    for p1, p2 in zip(o1.pairs, o2.pairs):
        W1, W2 = p1.delta_weight(), p2.delta_weight()
        out.append(f"{p1.name.split('.')[-2] if '.' in p1.name else p1.name}: dA={float((p1.A-p2.A).abs().max()):.1e} |A|={float(p1.A.abs().max()):.1e} dBA={float((W1-W2).abs().max()):.1e} |BA|={float(W1.abs().max()):.1e}")
    print(dtype, x_mode); print("\n".join(out))
