import torch, re, sys
from pathlib import Path
from crucible.model.generate import generate, heal_prompt
from crucible.runs import load_run_model
from crucible.tokenizer.train import load_tokenizer, eos_id
from crucible.evaluate.code_shape import PythonShape, cut_function
torch.set_num_threads(1)
m,_,_=load_run_model(Path('/tmp/qs-model')); tok=load_tokenizer(Path('/tmp/qs-model/tokenizer.json'))
eos=eos_id(tok)
SIG=re.compile(r"def [A-Za-z_]\w*\(")
for name, prefix in (("none",[]),("eos",[eos]),("newline",tok.encode("\n").ids)):
    gen=torch.Generator().manual_seed(0)
    ids=prefix+tok.encode("def ").ids
    healed, tail, allowed = heal_prompt(tok, ids)
    shapes=[];sig=0
    for _ in range(40):
        new=generate(m,healed,160,temperature=0.8,top_k=50,eos_token_id=eos,generator=gen,first_allowed=allowed)
        text="def "+tok.decode(new)[len(tail):]
        f=cut_function(text); shapes.append(PythonShape.of(f)); sig+=bool(SIG.match(f))
    n=len(shapes)
    print(name, "sig",sig/n, "indent",sum(s.indented for s in shapes)/n,"return",sum(s.has_return for s in shapes)/n,"bal",sum(s.balanced for s in shapes)/n,"parse",sum(s.parses for s in shapes)/n, flush=True)
