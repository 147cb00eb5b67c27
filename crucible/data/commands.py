"""CLI commands for data and tokenizers: `crucible tokenizer train|eval`, `crucible data
process|tokenize|inspect|mixture`. `register(subparsers)` adds them to the main parser; each leaf sets
``func`` (returning an exit code), as the other commands do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from crucible.argtypes import check_out_path, positive_float, positive_int, removed_on_failure
from crucible.tokenizer.words import BACKENDS, DEFAULT_BACKEND

DEFAULT_VOCAB = 8192


# ----------------------------------------------------------------------------- helpers


def _cap_bytes(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `limit` bytes."""
    return text.encode()[:limit].decode("utf-8", "ignore")


def _input_texts(specs: list[str], text_field: str, max_mb: float | None) -> Iterator[str]:
    """Texts of files/globs/directories (JSONL by suffix, else plain text) or `stdlib[:SUBSET]`.

    `max_mb` caps the UTF-8 bytes yielded over all `specs` together (1 MB = 10^6 bytes): the text
    that crosses the cap is cut, and nothing is read after it.
    """
    from crucible.data.sources import SourceConfig, iter_source

    budget = int(max_mb * 1e6) if max_mb else None
    used = 0
    for spec in specs:
        if spec == "stdlib" or spec.startswith("stdlib:"):
            subset = spec.partition(":")[2] or None
            cfg = SourceConfig(name="stdlib", kind="stdlib", subset=subset, max_mb=max_mb)
        else:
            kind = "jsonl" if re.search(r"\.jsonl(\.gz)?$|\.json$", spec) else "text"
            cfg = SourceConfig(name="input", kind=kind, paths=[spec], text_field=text_field)
        for doc in iter_source(cfg):
            text = doc.text
            if budget is not None:
                if used >= budget:
                    return
                text = _cap_bytes(text, budget - used)
            used += len(text.encode())
            yield text


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        label, sep, rest = v.partition("=")
        if not sep or not label or not rest:
            raise ValueError(f"{what} {v!r}: expected LABEL=VALUE")
        out.append((label, rest))
    return out


# ----------------------------------------------------------------------------- tokenizer


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from crucible.tokenizer.train import LAB_SPECIAL_TOKENS, load_tokenizer

    check_out_path(args.out, "--out")
    if args.special_tokens is not None and not all(args.special_tokens.split(",")):
        raise ValueError(f"--special-tokens {args.special_tokens!r}: empty token name")
    specials = tuple(args.special_tokens.split(",")) if args.special_tokens else LAB_SPECIAL_TOKENS
    texts = _input_texts(args.inputs, args.text_field, args.max_mb)
    try:
        path = _train_tokenizer(texts, args, specials)
    except ValueError as e:
        if "no text" in str(e):
            raise ValueError(f"{', '.join(args.inputs)}: {e}") from None
        raise
    n = load_tokenizer(path).get_vocab_size(with_added_tokens=True)
    print(f"wrote {path} ({n} tokens; special: {', '.join(specials)})")
    return 0


def _train_tokenizer(texts, args: argparse.Namespace, specials: tuple[str, ...]) -> Path:
    from crucible.tokenizer.train import train_tokenizer

    return train_tokenizer(
        texts,
        args.vocab_size,
        args.out,
        special_tokens=specials,
        min_frequency=args.min_frequency,
        round_to=args.round_to,
        split_digits=args.split_digits,
    )


def _cmd_tokenizer_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from crucible.tokenizer.metrics import EvalCorpus, evaluate_tokenizers
    from crucible.tokenizer.report import bar_chart, metrics_table, write_json

    check_out_path(args.out, "--out")
    names, paths = [], []
    for spec in args.tokenizers:
        label, sep, path = spec.partition("=")
        names.append(label if sep else None)
        paths.append(path if sep else spec)
    langs = dict(_pairs(args.lang or [], "--lang"))
    corpora = []
    for label, spec in _pairs(args.corpus, "--corpus"):
        text = "\n".join(_input_texts([spec], args.text_field, args.max_mb))
        if args.max_mb:  # the joining newlines count too: the cap holds for the whole corpus
            text = _cap_bytes(text, int(args.max_mb * 1e6))
        if not text.strip():
            raise ValueError(f"--corpus {label}={spec}: no text")
        lang = langs.get(label, label if re.fullmatch(r"[a-z]{2,3}", label) else None)
        corpora.append(EvalCorpus(label, text, lang))
    rows = evaluate_tokenizers(paths, corpora, args.splitter, args.collapse_whitespace, names=names)
    # Logs and pipes get a wide table, so no column (the splitter above all) is cut.
    Console(width=None if sys.stdout.isatty() else 200).print(metrics_table(rows))
    out = Path(args.out)
    print(f"wrote {write_json(rows, out / 'tokenizer_metrics.json')}")
    print(f"wrote {bar_chart(rows, out / 'tokenizer_metrics.png')}")
    return 0


# ----------------------------------------------------------------------------- data


def _cmd_data_process(args: argparse.Namespace) -> int:
    from crucible.data.pipeline import load_pipeline, run_pipeline

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    cfg = load_pipeline(args.pipeline)
    if args.executor != "local":
        from crucible.data.datatrove_run import run_datatrove

        stats = run_datatrove(cfg, args.executor, args.workers)
        if stats is None:
            print(f"submitted the Slurm jobs; {cfg.output}/stats.json appears when they finish")
            return 0
    else:
        workers = None if args.workers == 1 else args.workers
        stats = run_pipeline(cfg, show_progress=sys.stderr.isatty(), workers=workers)
    print(f"{stats['docs_in']} documents in, {stats['docs_out']} kept ({stats['seconds']} s)")
    for reason, n in stats["removed_by_reason"].items():
        print(f"  removed {n:>8}  {reason}")
    print(f"wrote {cfg.output}/ (stats.json, removed_sample.jsonl, one .jsonl per source)")
    if "tokenize" in stats:
        for name, s in stats["tokenize"]["sources"].items():
            print(f"  shards {name}: {s['tokens']:,} tokens, {s['docs']:,} docs")
    return 0


def _cmd_data_tokenize(args: argparse.Namespace) -> int:
    from crucible.data.tokenize import tokenize_jsonl_dir, tokenize_jsonl_files
    from crucible.tokenizer.train import load_tokenizer

    check_out_path(args.out, "--out")
    load_tokenizer(args.tokenizer)  # a bad file fails before anything is written
    kwargs = dict(
        num_workers=args.workers,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        show_progress=sys.stderr.isatty(),
    )
    with removed_on_failure(args.out):
        if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir():
            summary = tokenize_jsonl_dir(args.inputs[0], args.tokenizer, args.out, **kwargs)
        else:
            files = [Path(p) for p in args.inputs]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"no such file: {f}")
            summary = tokenize_jsonl_files(files, args.tokenizer, args.out, **kwargs)
    for name, s in summary["sources"].items():
        print(f"{args.out}/{name}: {s['tokens']:,} tokens, {s['docs']:,} docs ({s['dtype']})")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from crucible.data.inspect import format_report, histogram_png, inspect_path

    ins = inspect_path(args.path, args.tokenizer, args.samples, args.max_docs, args.seed)
    print(format_report(ins))
    print(f"wrote {histogram_png(ins, Path(args.out) / 'lengths.png')}")
    return 0


def _cmd_data_mixture(args: argparse.Namespace) -> int:
    import yaml

    from crucible.data.mixture import plan_epochs

    if not Path(args.plan).is_file():
        raise FileNotFoundError(f"{args.plan}: no such mixture plan")
    try:
        plan = yaml.safe_load(Path(args.plan).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{args.plan}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{args.plan}: expected a mapping with `stages:` and `available:`")

    def num(value, where: str, zero_ok: bool = False) -> float:
        # YAML 1.1 reads 5.1e12 (no sign in the exponent) as a string: accept it as a number.
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{args.plan}: {where} {value!r} is not a number") from None
        if not (x >= 0 if zero_ok else x > 0) or x != x:
            raise ValueError(
                f"{args.plan}: {where} {value!r} must be {'>= 0' if zero_ok else '> 0'}"
            )
        return x

    available = {k: num(v, f"available.{k}") for k, v in (plan.get("available") or {}).items()}
    if "shards" in plan:  # token counts from a `data tokenize` output
        root = Path(args.plan).parent / plan["shards"]
        summary = json.loads((root / "sources.json").read_text())
        available.update({k: v["tokens"] for k, v in summary["sources"].items()})
    stages = []
    for i, st in enumerate(plan.get("stages") or []):
        if not isinstance(st, dict) or not {"name", "tokens", "weights"} <= set(st):
            raise ValueError(f"{args.plan}: stages[{i}] needs name, tokens and weights")
        weights = {k: num(w, f"stages[{i}].weights.{k}", True) for k, w in st["weights"].items()}
        stages.append((st["name"], num(st["tokens"], f"stages[{i}].tokens"), weights))
    if not stages:
        raise ValueError(f"{args.plan}: no stages")
    missing = {src for _, _, w in stages for src in w} - set(available)
    if missing:
        raise ValueError(f"{args.plan}: no available token count for {sorted(missing)}")
    print(f"{'stage':<12} {'source':<16} {'tokens':>14} {'epochs':>8} {'max share':>10}")
    for r in plan_epochs(stages, available, args.max_epochs):
        flag = "  <- over the epoch ceiling" if r["warning"] else ""
        print(
            f"{r['stage']:<12} {r['source']:<16} {r['tokens']:>14.4g} "
            f"{r['epochs_cumulative']:>8.2f} {r['max_share']:>10.2%}{flag}"
        )
    return 0


# ----------------------------------------------------------------------------- wiring


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tokenizer` and `data` command groups to the top-level subparsers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    tok = subparsers.add_parser("tokenizer", help="train and compare tokenizers")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)

    p = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer (tokenizer.json)",
        description="Byte-level BPE with HF tokenizers. The vocabulary is padded with reserved "
        "special tokens to exactly --vocab-size rounded up to --round-to. Special tokens take "
        "the first ids (EOS first). The output loads with transformers.PreTrainedTokenizerFast.",
        formatter_class=fmt,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="text files, directories or globs (.jsonl read as JSONL), or stdlib[:SUBSET] "
        "for the embedded corpus (SUBSET: stdlib-code, stdlib-docs, pydoc-topics)",
    )
    p.add_argument("--out", required=True, help="output directory (or a .json file)")
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB)
    p.add_argument(
        "--round-to", type=positive_int, default=128, help="round the vocabulary up to this"
    )
    p.add_argument("--split-digits", action="store_true", help="one token per digit")
    p.add_argument(
        "--min-frequency", type=positive_int, default=2, help="least count of a merged pair"
    )
    p.add_argument(
        "--special-tokens",
        help="comma-separated, EOS first (default: <|endoftext|>, <|pad|>, <|im_start|>, "
        "<|im_end|>, <|begin_of_text|>)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument(
        "--max-mb", type=positive_float, help="use at most this many MB of text, over all inputs"
    )
    p.set_defaults(func=_cmd_tokenizer_train)

    p = tsub.add_parser(
        "eval",
        help="fertility, continued words, bytes/chars per token: table + bar chart",
        description="Compare tokenizers on corpora. Fertility = tokens per word (each word "
        "encoded alone); continued words = share of words of 2+ tokens; bytes/chars per token "
        "on the whole text. Words come from --splitter: regex (default; \\w+ runs and punctuation "
        "runs, elided articles kept for fr/it), whitespace (str.split), or spacy (spacy.blank "
        "rules; needs spaCy). The table and JSON name the splitter that ran.",
        formatter_class=fmt,
    )
    p.add_argument(
        "tokenizers",
        nargs="+",
        help="tokenizer.json files or tokenizer directories, optionally NAME=PATH",
    )
    p.add_argument(
        "--corpus",
        action="append",
        required=True,
        help="LABEL=PATH (file, dir, glob, .jsonl, or stdlib[:SUBSET]); repeat. A 2-3 letter "
        "LABEL (en, fr...) is also the language",
    )
    p.add_argument("--lang", action="append", help="LABEL=CODE: language of a corpus")
    p.add_argument(
        "--splitter",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="word definition (fertility depends on it; see docs/data.md)",
    )
    p.add_argument(
        "--collapse-whitespace",
        action="store_true",
        help="collapse whitespace runs first (prose: indentation would dominate bytes/token)",
    )
    p.add_argument(
        "--max-mb",
        type=positive_float,
        default=2.0,
        help="cap on UTF-8 text per corpus, over all its files",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", default="tokenizer-eval", help="where the JSON and PNG go")
    p.set_defaults(func=_cmd_tokenizer_eval)

    data = subparsers.add_parser("data", help="process, tokenize and mix training data")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser(
        "process",
        help="filter and deduplicate sources as a pipeline.yaml says",
        description="Run sources through quality filters (gopher_quality, gopher_repetition, "
        "c4, fineweb_quality, span_repeats, language) and dedup (exact_dedup, minhash_dedup), "
        "in the listed order. Writes one JSONL per source, stats.json (removals by reason) and "
        "removed_sample.jsonl; optionally tokenizes. See docs/data.md for the file format.",
        formatter_class=fmt,
    )
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local worker processes for the filters (and tokenization); 1: this process. "
        "Output is identical for any N",
    )
    p.add_argument(
        "--executor",
        choices=("local", "datatrove-local", "slurm", "ray"),
        default="local",
        help="local: this machine (--workers processes); the others run the same steps as "
        "datatrove jobs (needs datatrove; slurm needs sbatch and datatrove.slurm in the file; "
        "ray needs ray). See docs/data.md",
    )
    p.set_defaults(func=_cmd_data_process)

    p = dsub.add_parser(
        "tokenize",
        help="JSONL documents -> .ds shards, one directory per source",
        description="Tokenize a `data process` output directory (or JSONL files) into "
        "OUT/<source>/ shards (.ds/.ds.index, datatrove layout; EOS after each document).",
        formatter_class=fmt,
    )
    p.add_argument("inputs", nargs="+", help="a processed directory, or .jsonl files")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    p.add_argument("--shard-tokens", type=positive_int, help="tokens per .ds file (default 64 Mi)")
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_cmd_data_tokenize)

    p = dsub.add_parser(
        "inspect",
        help="documents, tokens, length histogram, source shares, samples of a dataset",
        description="Inspect a shard directory (dataset.json, bare .ds files, or a `data "
        "tokenize` output), a JSONL file or directory, or a mixture YAML (`shards: DIR` or "
        "`sources: {name: dir}`, also under `data:`). Prints documents, tokens, each source's "
        "share, a length histogram and decoded samples; writes OUT/lengths.png; warns where "
        "shards and tokenizer disagree.",
        formatter_class=fmt,
    )
    p.add_argument("path", help="shard directory, .jsonl file/directory, or mixture .yaml")
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json to check the shards against (and to count JSONL tokens with)",
    )
    p.add_argument("--samples", type=int, default=3, help="decoded documents shown per source")
    p.add_argument("--max-docs", type=int, help="JSONL: read at most this many documents")
    p.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    p.add_argument("--out", default="data-inspect", help="where lengths.png goes")
    p.set_defaults(func=_cmd_data_inspect)

    p = dsub.add_parser(
        "mixture",
        help="token and epoch accounting of a multi-stage mixture plan",
        description="Reads a YAML with `stages: [{name, tokens, weights: {source: w}}]` and "
        "`available: {source: tokens}` (or `shards: DIR` with a sources.json) and prints, per "
        "stage and source, drawn tokens, cumulative epochs and the largest share that stays "
        "within --max-epochs.",
        formatter_class=fmt,
    )
    p.add_argument("plan", help="mixture plan YAML")
    p.add_argument("--max-epochs", type=positive_float, default=4.0)
    p.set_defaults(func=_cmd_data_mixture)
