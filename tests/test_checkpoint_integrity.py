"""A damaged checkpoint is never loaded silently: a flipped byte or a missing file in the newest
step falls back to the previous step with a warning naming what was skipped, a checkpoint with
no intact step is refused in one line, a killed save's temporary folder is removed, and an
intact checkpoint (or the fallback) resumes bit for bit."""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import optax
import pytest

import hypergradient as hg
from hypergradient.drivers import checkpoint
from hypergradient.drivers.checkpoint import CheckpointMismatchError, CheckpointWarning
from hypergradient.drivers.offline import optimize
from hypergradient.drivers.online import online
from problems import ridge_problem

HYPER = optax.adam(0.05)


def run(ckpt_dir, hyper_steps):
    dyn, objective, lam = ridge_problem(steps=5)
    return optimize(dyn, objective, lam, hyper_optimizer=HYPER, hyper_steps=hyper_steps, checkpoint_dir=ckpt_dir,
                    progress=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A checkpoint directory of three hyper-steps, a write after each: it keeps steps 2 and 3."""
    root = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoint, "CHECKPOINT_SECONDS", 0.0)
        run(root, 3)
    assert sorted(os.listdir(root / "optimize")) == ["2", "3"]
    return root


@pytest.fixture
def ckpt_dir(pristine, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHECKPOINT_SECONDS", 0.0)
    shutil.copytree(pristine, tmp_path / "c")
    return tmp_path / "c"


def arrays_of(saved):
    return {name: {i: np.asarray(a) for i, a in tree.items()} for name, tree in saved._arrays.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for i in a[name]:
            assert a[name][i].dtype == b[name][i].dtype
            np.testing.assert_array_equal(a[name][i], b[name][i])


def flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def offsets(file):
    n = file.stat().st_size
    return sorted({0, n // 3, n // 2, (2 * n) // 3, n - 1})


def step_files(step_dir, under=""):
    return sorted(p.relative_to(step_dir).as_posix() for p in (step_dir / under).rglob("*") if p.is_file())


def load_falling_back(path, skipped: str):
    """Load ``path``; it must warn that step 3 was skipped (naming ``skipped``) and give step 2."""
    with pytest.warns(CheckpointWarning) as caught:
        saved = checkpoint.load(path)
    message = " ".join(str(w.message) for w in caught)
    assert "step 3" in message and skipped in message, message
    assert saved.header["step"] == 2
    return saved


def test_an_intact_checkpoint_loads_without_a_warning(pristine):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        saved = checkpoint.load(pristine / "optimize")
    assert saved.header["step"] == 3
    step = pristine / "optimize" / "3"
    listed = json.loads((step / checkpoint.INTEGRITY).read_text())["files"]
    assert checkpoint.INTEGRITY not in listed and "arrays/manifest.ocdbt" in listed
    assert sorted([*listed, checkpoint.INTEGRITY]) == step_files(step)  # every other file of the step
    meta = json.loads((step / "meta" / "metadata").read_text())
    assert set(meta["digests"]) == set(meta["trees"])  # λ, optimizer state, best λ, history: each digested
    assert all(meta["digests"]["hparams"].values())


def test_a_flipped_byte_in_any_array_file_falls_back_to_the_previous_step(pristine, ckpt_dir, tmp_path):
    path = ckpt_dir / "optimize"
    newest = arrays_of(checkpoint.load(path))
    shutil.copytree(pristine, tmp_path / "only2")
    shutil.rmtree(tmp_path / "only2" / "optimize" / "3")
    previous = arrays_of(checkpoint.load(tmp_path / "only2" / "optimize"))
    files = step_files(path / "3", "arrays")
    assert len(files) >= 4  # orbax's manifests, metadata and data files
    tried = 0
    for rel in files:
        target = path / "3" / rel
        original = target.read_bytes()
        for offset in offsets(target):
            flip(target, offset)
            assert_same(arrays_of(load_falling_back(path, rel)), previous)
            target.write_bytes(original)
            tried += 1
    assert tried >= 4 * 3
    assert_same(arrays_of(checkpoint.load(path)), newest)  # the bytes restored: step 3 intact again


def test_array_digests_catch_what_orbax_reads_back_wrong(tmp_path):
    """With integrity.json rewritten after each flip, so that only the arrays' own digests stand
    guard: a flip in the bytes of an array's values, which orbax reads back without an error, is
    still refused by name; a flip anywhere in the data files either fails in orbax, is refused by
    a digest, or leaves every array exactly as saved."""
    path = tmp_path / "big"
    saved = {"hparams": {"w": np.linspace(-1.0, 1.0, 4000), "lr": np.asarray(0.1)},
             "history": {"value": np.arange(7.0)}}
    for step in (1, 2):
        checkpoint.save(path, saved, {"step": step})
    step = path / "2"
    data = [rel for rel in step_files(step, "arrays") if "/d/" in f"/{rel}"]
    reasons = []
    for rel in data:
        target = step / rel
        original = target.read_bytes()
        for offset in offsets(target):
            flip(target, offset)
            checkpoint._write_integrity(str(step))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CheckpointWarning)
                loaded = checkpoint.load(path)
            if caught:
                assert loaded.header["step"] == 1
                reasons.append(str(caught[0].message))
            else:  # a byte orbax does not read back: the arrays are those saved
                assert loaded.header["step"] == 2
                np.testing.assert_array_equal(loaded.restore_dict("hparams")["w"], saved["hparams"]["w"])
            target.write_bytes(original)
    checkpoint._write_integrity(str(step))
    assert checkpoint.load(path).header["step"] == 2
    assert any("hparams['w']" in r and "SHA-256 differs" in r for r in reasons), reasons


ABANDONED_READS = """
import sys
from pathlib import Path
import numpy as np
from hypergradient.drivers import checkpoint
path = Path(sys.argv[1])
checkpoint.save(path, {"hparams": {f"w{i}": np.full(100, float(i)) for i in range(16)}}, {"step": 1})
for manifest in (path / "1").rglob("manifest.ocdbt"):
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
checkpoint._write_integrity(str(path / "1"))
for _ in range(5):
    try:
        checkpoint.load(path)
    except checkpoint.CheckpointMismatchError as e:
        error = e
print(error)
"""


def test_orbax_reading_damaged_data_leaves_one_error_and_no_traceback(tmp_path):
    """Truncated manifests with integrity.json rewritten to match: orbax reads the damaged data,
    fails and abandons the reads in flight, which complete into its closed event loop. The
    process prints the error alone: no "Event loop is closed" traceback, no orbax log."""
    done = subprocess.run([sys.executable, "-c", ABANDONED_READS, str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert "not a readable hypergradient checkpoint" in done.stdout
    assert done.stderr == "", done.stderr


@pytest.mark.parametrize("name", ["_CHECKPOINT_METADATA", "commit_success.txt", "arrays/manifest.ocdbt",
                                  "arrays/_METADATA", "arrays/commit_success.txt", "meta/metadata",
                                  checkpoint.INTEGRITY])
def test_a_deleted_file_falls_back_and_is_refused_in_both_steps(ckpt_dir, name):
    path = ckpt_dir / "optimize"
    if not (path / "3" / name).exists():
        pytest.skip(f"this orbax-checkpoint version writes no {name}")
    (path / "3" / name).unlink()
    load_falling_back(path, name)
    (path / "2" / name).unlink()
    with pytest.raises(CheckpointMismatchError, match="not a readable") as info:
        checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message and "step 3" in message and "step 2" in message and "afresh" in message


def test_every_step_damaged_is_refused_in_one_line(ckpt_dir):
    path = ckpt_dir / "optimize"
    for step in ("2", "3"):
        target = path / step / "arrays" / "_METADATA"
        flip(target, target.stat().st_size // 2)
    with pytest.raises(CheckpointMismatchError, match="not a readable") as info:
        run(ckpt_dir, 5)
    assert "\n" not in str(info.value) and "arrays/_METADATA" in str(info.value)


def test_a_save_cut_short_before_its_file_list_falls_back(ckpt_dir, monkeypatch):
    monkeypatch.setattr(checkpoint, "_write_integrity", lambda folder: None)  # killed right after orbax's rename
    run(ckpt_dir, 4)
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning, match="cut short"):
        saved = checkpoint.load(ckpt_dir / "optimize")
    assert saved.header["step"] == 3


def test_a_stale_temporary_folder_is_removed_when_the_directory_is_opened(ckpt_dir):
    path = ckpt_dir / "optimize"
    stale = path / "4.orbax-checkpoint-tmp-1733450000123456"
    (stale / "arrays").mkdir(parents=True)
    (stale / "arrays" / "manifest.ocdbt").write_bytes(b"half")
    assert checkpoint.load(path).header["step"] == 3
    assert not stale.exists() and sorted(os.listdir(path)) == ["2", "3"]


def test_intact_and_fallen_back_checkpoints_resume_bit_for_bit(pristine, ckpt_dir, tmp_path):
    full = run(None, 6)
    shutil.copytree(pristine, tmp_path / "intact")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        intact = run(tmp_path / "intact", 6)
    target = ckpt_dir / "optimize" / "3" / "arrays" / "manifest.ocdbt"
    flip(target, 0)
    with pytest.warns(CheckpointWarning) as caught:
        fallen = run(ckpt_dir, 6)  # redoes hyper-step 2 from step 2's state
    messages = [str(w.message) for w in caught]
    assert any("skipped" in m and "step 3" in m for m in messages), messages
    assert any("moved to" in m for m in messages), messages
    assert os.listdir(ckpt_dir / "optimize.damaged") == ["3"]
    for res in (intact, fallen):
        assert res.steps == 6
        np.testing.assert_array_equal(res.history["value"], full.history["value"])
        np.testing.assert_array_equal(res.history["hparams"]["lr"], full.history["hparams"]["lr"])
        for k in full.hparams:
            assert float(res.hparams[k]) == float(full.hparams[k])
    with warnings.catch_warnings():  # the damaged step is gone from the directory: no more warnings
        warnings.simplefilter("error", CheckpointWarning)
        assert checkpoint.load(ckpt_dir / "optimize").header["step"] == 6


def test_a_checkpoint_written_without_digests_still_loads(ckpt_dir):
    """Format 2 before digests: no integrity.json, no digests in the meta. It loads, with a warning."""
    path = ckpt_dir / "optimize"
    shutil.rmtree(path / "2")
    (path / "3" / checkpoint.INTEGRITY).unlink()
    meta_file = path / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["digests"]
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(CheckpointWarning, match="unchecked"):
        saved = checkpoint.load(path)
    assert saved.header["step"] == 3


def test_another_format_is_refused(ckpt_dir):
    path = ckpt_dir / "optimize"
    for step in ("2", "3"):
        meta_file = path / step / "meta" / "metadata"
        meta_file.write_text(meta_file.read_text().replace('"format": 2', '"format": 1', 1))
        checkpoint._write_integrity(str(path / step))
    with pytest.raises(CheckpointMismatchError, match="format 1, expected 2"):
        checkpoint.load(path)


def test_online_a_flipped_byte_in_the_carry_falls_back_and_resumes_bit_for_bit(tmp_path):
    """The online driver's carry (weights, tangent, λ, optimizer states) and rows are digested
    too: a damaged newest step is skipped, and the run resumes to the uninterrupted result."""
    dyn, objective, lam = ridge_problem(steps=20)
    kwargs = dict(method=hg.Forward(), every=5, hyper_optimizer=HYPER, chunk=1, progress=False)
    full = online(dyn, objective, lam, **kwargs)
    path = tmp_path / "online"
    written = online(dyn, objective, lam, checkpoint_dir=tmp_path, **kwargs)
    assert sorted(os.listdir(path)) == ["3", "4"]
    meta = json.loads((path / "4" / "meta" / "metadata").read_text())
    assert meta["digests"]["carry"] and meta["digests"]["rows"]
    for rel in step_files(path / "4", "arrays"):
        target = path / "4" / rel
        original = target.read_bytes()
        flip(target, target.stat().st_size // 2)
        with pytest.warns(CheckpointWarning, match=rel):
            assert checkpoint.load(path).header["step"] == 3
        target.write_bytes(original)
    flip(path / "4" / "arrays" / "manifest.ocdbt", 0)
    with pytest.warns(CheckpointWarning, match="step 4"):
        resumed = online(dyn, objective, lam, checkpoint_dir=tmp_path, **kwargs)
    assert written.steps == resumed.steps == full.steps == 4
    np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(full.params))
    for k in ("value", "train_loss"):
        np.testing.assert_array_equal(resumed.history[k], full.history[k])


def test_only_the_abandoned_reads_failures_are_kept_out_of_the_asyncio_log(caplog):
    """A read that fails after the restore gave up is logged by asyncio when collected ("Task
    exception was never retrieved"); load drops that record and no other."""
    checkpoint._drop_abandoned_reads()
    log = logging.getLogger("asyncio")

    def never_retrieved(error):
        log.error("Task exception was never retrieved\nfuture: <Task finished>", exc_info=(type(error), error, None))

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        never_retrieved(ValueError('DATA_LOSS: Error opening "zarr" driver [tensorstore_spec=\'{}\']'))
        never_retrieved(ValueError("a user's own task failed"))
        log.error("Unclosed event loop, tensorstore")
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        "Task exception was never retrieved", "Unclosed event loop, tensorstore"]
    assert "a user's own task failed" in str(caplog.records[0].exc_info[1])
