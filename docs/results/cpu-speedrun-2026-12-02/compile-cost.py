import sys, time, torch
sys.path.insert(0,'bench')
from cpu_speedrun import build_ours
from cpu_step import one_step
from crucible.config import load_config
torch.set_num_threads(2)
cfg=load_config("tiny-speedrun")
xy=torch.randint(0,4096,(16,257),generator=torch.Generator().manual_seed(0))
for compiled in (False, True):
    arm=build_ours("ours",cfg,compiled)
    t=time.perf_counter(); one_step(arm,xy,torch.bfloat16); one_step(arm,xy,torch.bfloat16); first=time.perf_counter()-t
    ts=[]
    for _ in range(8):
        t=time.perf_counter(); one_step(arm,xy,torch.bfloat16); ts.append(time.perf_counter()-t)
    ts.sort(); med=ts[4]
    print(f"compiled={compiled}: first two steps {first:.1f} s, median step after {med*1e3:.0f} ms, 300 steps ~ {first+298*med:.0f} s")
