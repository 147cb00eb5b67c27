"""Commands `dpo`, `grpo`, `distill` (training from a base model) and `pref-data`."""

from __future__ import annotations

import argparse

CONFIG_HELP = "a YAML config with a `{}:` section (init_from and the method's options)"
OVERRIDES_HELP = "dotted overrides, e.g. dpo.beta=0.2 train.steps=100 (values parsed as YAML)"


def _train_command(section: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        from crucible.config import load_config

        cfg = load_config(args.config, args.overrides)
        if section == "dpo":
            from crucible.posttrain.dpo_run import run_dpo as fn
        elif section == "grpo":
            from crucible.posttrain.grpo_run import run_grpo as fn
        else:
            from crucible.posttrain.distill_run import run_distill as fn
        result = fn(cfg, resume=args.resume, quiet=args.quiet)
        print(f"{section}: {result.step} steps, run directory {result.run_dir}")
        return 0

    return run


def _cmd_pref_data(args: argparse.Namespace) -> int:
    from crucible.posttrain.pref_data import build_preference_data

    build_preference_data(
        out=args.out, chosen_from=args.chosen_from, rejected_from=args.rejected_from,
        n=args.n, samples=args.samples, seed=args.seed, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, verifier=args.verifier, think=args.think,
    )  # fmt: skip
    return 0


DESCRIPTIONS = {
    "dpo": "Preference optimisation (sigmoid DPO, IPO, APO-zero, APO-down) of a base model "
    "(dpo.init_from) on chosen/rejected pairs (dpo.data), with reference log-probs cached in the "
    "run directory or computed on the fly. Logs chosen/rejected rewards, margins and accuracy.",
    "grpo": "RL with verifiable rewards (GRPO, BNPO, Dr. GRPO, DAPO): G sampled completions per "
    "prompt with the KV cache, rewards from verifiers, group-relative advantages, clipping, an "
    "optional k3 KL to the starting model, masking of truncated completions and DAPO's soft "
    "overlong penalty.",
    "distill": "On-policy distillation (GKD): the generalized Jensen-Shannon divergence to a "
    "teacher with the same tokenizer (distill.teacher), on the dataset's completions or, for a "
    "share lmbda of the steps, on completions the student samples itself.",
}


def register(sub: argparse._SubParsersAction) -> None:
    for section in ("dpo", "grpo", "distill"):
        p = sub.add_parser(section, help=DESCRIPTIONS[section].split(":")[0].split(" (")[0],
                           description=DESCRIPTIONS[section])  # fmt: skip
        p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP.format(section))
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        p.add_argument("--resume", action="store_true", help="continue the run's own checkpoints")
        p.add_argument("--quiet", action="store_true", help="no console progress")
        p.set_defaults(func=_train_command(section))

    p = sub.add_parser(
        "pref-data",
        help="build offline preference pairs from the chat generator's verifiable arithmetic",
        description="The SmolLM3 recipe offline: for held-in arithmetic prompts of the synthetic "
        "chat generator, sample answers and write {prompt, chosen, rejected} JSONL. With one "
        "model (--chosen-from), chosen is a verifier-correct sample and rejected a "
        "verifier-wrong one; with --rejected-from too, chosen comes from the stronger model "
        "(a correct sample) and rejected from the weaker one. Prompts without a usable pair are "
        "counted and reported.",
    )
    p.add_argument("out", help="output JSONL file")
    p.add_argument("--chosen-from", required=True, help="run or HF directory (the stronger model)")
    p.add_argument("--rejected-from", default=None, help="run or HF directory (the weaker model)")
    p.add_argument("--n", type=int, default=200, help="prompts to try")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt and model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--verifier", default="last_number", help="reward function judging answers")
    p.add_argument("--think", action="store_true", help="prompts in think mode")
    p.set_defaults(func=_cmd_pref_data)
