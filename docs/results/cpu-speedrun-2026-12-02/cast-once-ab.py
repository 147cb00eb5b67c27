import sys, time, statistics, torch
sys.path.insert(0,'bench')
from cpu_speedrun import build_ours
from cpu_step import one_step
from crucible.config import load_config
import crucible.model.transformer as T
torch.set_num_threads(int(sys.argv[1]))
cfg=load_config("tiny")
arm=build_ours("ours",cfg,False)
xy=torch.randint(0,4096,(16,257),generator=torch.Generator().manual_seed(0))
res={True:[],False:[]}
for i in range(40):
    flag = i%2==0
    T.CAST_ONCE=flag
    t=time.perf_counter(); one_step(arm,xy,torch.bfloat16); dt=time.perf_counter()-t
    if i>=4: res[flag].append(dt)
for f in (False,True): print(sys.argv[1],'cast_once',f, round(statistics.median(res[f])*1e3,1),'ms')
