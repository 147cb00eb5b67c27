"""No command deletes what it did not create: every module that deletes files is listed here with
the reason its deletions are safe. A new `rmtree`/`unlink` elsewhere fails this test until it is
reviewed and added (with the guard that makes it safe)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "crucible"
DELETES = re.compile(r"rmtree\(|\.unlink\(|os\.remove\(")

REVIEWED = {
    "ablate/runner.py": "--fresh removes the suite's own runs/ and jobs/ under its output folder",
    "argtypes.py": "removed_on_failure: only a path that did not exist before the command",
    "data/chat_source.py": "its own temporary build folder (.NAME.tmp-PID) in the data cache",
    "data/datatrove_run.py": "its own work_dir (fingerprint file checked; foreign ones refused) "
    "and stale .jsonl in a previous pipeline output",
    "data/workers.py": "its own OUTPUT/.parts task files and temporaries",
    "data/pipeline.py": "stale .jsonl only in a previous pipeline output (stats.json checked)",
    "data/prepare.py": "its own temporary build folder, or an incomplete build in its cache",
    "data/shards.py": "its own temporary files; old shards of the same prefix only with overwrite",
    "evaluate/sandbox/launch.py": "the sandbox's own temporary files",
    "evaluate/sandbox/process.py": "the sandbox's own temporary working folder",
    "infra/commands.py": "bench storage's own test file (unless --keep)",
    "infra/storage.py": "bench storage's own probe and test files",
    "model/hf.py": "its own temporary export; replaces only a previous export (marker checked)",
    "posttrain/conversations.py": "its own temporary file",
    "posttrain/recipe.py": "a stage directory it redoes, only when the recipe's own marker "
    "(OUT_DIR/.recipe/STAGE.json) says the recipe made it",
    "posttrain/merge_io.py": "its own temporary folder; --overwrite only a previous merge",
    "quickstart.py": "only a run folder the quickstart made (marker checked)",
    "train/checkpoint.py": "its own temporary and pruned checkpoints",
    "train/checkpoint_manifest.py": "its own temporary parts",
    "train/checkpoint_store.py": "pruned checkpoints of the run it trains",
    "train/preflight_full.py": "its own fresh .preflight-<uuid> scratch folder",
    "train/setup.py": "summary.json / stopped.json of the run being resumed, after the checks",
}


def test_every_module_that_deletes_is_reviewed():
    found = {
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if DELETES.search(p.read_text(encoding="utf-8"))
    }
    unreviewed = sorted(found - set(REVIEWED))
    assert not unreviewed, f"deletes to review (and add to REVIEWED with the guard): {unreviewed}"
