"""Storage read throughput, the checkpoint round trip, and the data-loader benchmark."""

import numpy as np
import pytest
import torch

from crucible.infra import storage
from crucible.infra.dataload import loader_throughput


def test_read_throughput_reads_every_byte_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5000)
    r = storage.read_throughput(tmp_path)
    assert (r.files, r.bytes) == (2, 8000) and r.mb_s > 0
    limited = storage.read_throughput(tmp_path, limit_bytes=3000)
    assert (limited.files, limited.bytes) == (1, 3000)


def test_fresh_test_file_has_the_requested_size(tmp_path):
    path, wrote = storage.write_test_file(tmp_path, 3 * storage.BLOCK // 2)
    assert path.stat().st_size == wrote.bytes == 3 * storage.BLOCK // 2
    assert storage.read_throughput_file(path).bytes == wrote.bytes


def test_unwritable_or_missing_directory_is_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.check_dir(tmp_path / "absent")
    (tmp_path / "f").write_text("")
    with pytest.raises(storage.StorageError, match="is not a directory"):
        storage.check_dir(tmp_path / "f", writable=True)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(storage.tempfile, "mkstemp", denied)  # root ignores chmod: inject it
    with pytest.raises(storage.StorageError) as e:
        storage.checkpoint_roundtrip(tmp_path)
    assert str(e.value) == f"{tmp_path} is not writable (Permission denied)"


def test_checkpoint_round_trip_writes_reads_back_identical_and_cleans_up(tmp_path, monkeypatch):
    import crucible.train.checkpoint as ckpt

    written = {}
    real_save = ckpt.save_checkpoint

    def spy_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        written.update({f.name: f.stat().st_size for f in path.iterdir()})
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", spy_save)
    before = torch.get_rng_state()
    trip = storage.checkpoint_roundtrip(tmp_path, width=64, layers=2)
    assert trip.identical and trip.tensors == 4 + 3 * 4  # weights+biases; exp_avg, _sq, step
    # The model really reached the disk: 2 x (64 x 64 + 64) fp32 values in model.safetensors.
    assert written["model.safetensors"] >= 2 * (64 * 64 + 64) * 4
    assert trip.bytes == sum(written.values())
    assert list(tmp_path.iterdir()) == []  # cleaned up
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone


def test_checkpoint_round_trip_reports_a_corrupted_read(tmp_path, monkeypatch):
    import crucible.train.checkpoint as ckpt

    real_load = ckpt.load_checkpoint

    def corrupt_load(path, model, optimizer):
        state = real_load(path, model, optimizer)
        with torch.no_grad():
            model[0].weight.view(-1)[5] += 1  # one flipped value must be caught
        return state

    monkeypatch.setattr(ckpt, "load_checkpoint", corrupt_load)
    trip = storage.checkpoint_roundtrip(tmp_path, width=32, layers=2)
    assert not trip.identical and trip.mismatched == ["model.0.weight"]


def test_loader_throughput_counts_tokens(tmp_path):
    np.random.default_rng(0).integers(0, 500, 20_000, dtype=np.uint16).tofile(tmp_path / "s.ds")
    r = loader_throughput(str(tmp_path), seq_len=64, batch=4, min_time_s=0.05)
    assert r.steps >= 1 and r.tokens == r.steps * 4 * 64
    assert r.corpus_tokens == 20_000 and r.token_bytes == 2
    assert r.tokens_per_s == pytest.approx(r.tokens / r.seconds)
