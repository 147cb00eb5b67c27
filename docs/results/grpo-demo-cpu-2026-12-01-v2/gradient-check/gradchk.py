"""Is the GRPO gradient of the SFT model right, and how far can one step go along it?
16 training prompts x 32 completions (one rollout of crucible's Rollout, the loss of its
make_objective, loss_type given as argv[1]); then a step of L2 length eta (in parameter space)
along minus the gradient, and the mean probability of the exact reply "The answer is N." before
and after. Negative eta: the opposite direction. Run: python gradchk.py grpo (one thread)."""
import json, sys, types, torch
from crucible.config import load_config
from crucible.train.init_from import load_base
from crucible.tokenizer.train import load_tokenizer
from crucible.posttrain.rollout import ChatPrompter
from crucible.posttrain.grpo_run import read_prompts, with_system, Rollout, make_objective, PromptStep
torch.manual_seed(0)
sft = "/work/runs-grpo/final/sft"
b = load_base(sft); model = b.build()
tok = load_tokenizer(b.tokenizer_path); pr = ChatPrompter.from_tokenizer(tok)
prompts = with_system(read_prompts("/work/runs-grpo/final/grpo_prompts.jsonl", think=False), "/system_override Be brief.")[:16]
cfg = load_config(None, ["out_dir=/tmp/x", "name=x", "train.global_batch_size=512", "train.micro_batch_size=512",
    f"grpo.init_from={sft}", "grpo.prompts=/work/runs-grpo/final/grpo_prompts.jsonl", "grpo.group_size=32",
    "grpo.max_completion_length=24", "grpo.loss_type=" + sys.argv[1], "grpo.scale_rewards=group"])
cfg = cfg.model_copy(update={"model": b.model_cfg})
def pcorrect():
    model.eval(); out=[]
    with torch.no_grad():
        for p in prompts:
            ids = pr.prompt_ids(p.messages, p.template_kwargs)
            comp = tok.encode(f"The answer is {p.columns['answer']}.").ids + [pr.stop_ids[0]]
            x = torch.tensor([ids + comp]); lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            tgt = x[0, 1:]; l = lp.gather(-1, tgt[:, None])[:, 0][len(ids)-1:]
            out.append(l.sum().exp().item())
    return sum(out)/len(out)
ro = Rollout(cfg, pr, None)
run = types.SimpleNamespace(model=model, amp=None, device=torch.device("cpu"), say=print, grad_accum=1)
print("before p_correct", pcorrect())
batches = ro.on_batches(run, 1, [PromptStep(prompts)] if True else None)
print("sampled acc", [bt.stats["accuracy"] for bt in batches])
model.train(); obj = make_objective(cfg.grpo)
for bt in batches:
    obj(run, bt).loss.backward()
with torch.no_grad():
    g2 = sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)
    saved = [p.detach().clone() for p in model.parameters()]
    for eta in [-0.02, 0.005, 0.02, 0.05, 0.2]:
        for p, s0 in zip(model.parameters(), saved):
            p.copy_(s0)
            if p.grad is not None: p -= eta / g2.sqrt() * p.grad
        print("step", eta, "p_correct", pcorrect())
