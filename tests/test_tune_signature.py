"""The signature over a tune experiment's Ray Tune state: the key, the manifest, what is refused.

Ray-free: a fake experiment directory holds files named as Ray Tune names them. The sweep that
writes and signs a real one, is killed, resumes, and is then tampered with is
``tests/distributed/test_tune.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat

import pytest

from unibct_ray.errors import ConfigError
from unibct_ray.tune_signature import (KEY_ENV, SIGNATURE_FILE, key_file, load_key, sign_files, tune_state_files,
                                       verify_experiment)

STATE = ("tuner.pkl", "experiment_state-2026-01-01_00-00-00.json", "search_gen_state-2026-01-01_00-00-00.json",
         "searcher-state-2026-01-01_00-00-00.pkl", "t1/params.pkl")


@pytest.fixture
def experiment(tmp_path):
    """DIR with a recipe and Ray Tune's state files, signed; -> DIR."""
    exp = tmp_path / "sweep"
    (exp / "trials" / "t1").mkdir(parents=True)
    (exp / "tune-spec.json").write_text('{"num_samples": 2}\n')
    for i, name in enumerate(STATE):
        (exp / "trials" / name).write_bytes(pickle.dumps({"state": i}))
    (exp / "trials" / "t1" / "progress.csv").write_text("a,b\n")  # not a state file
    sign_files(exp, {"tune-spec.json": exp / "tune-spec.json",
                     **{f"trials/{r}": p for r, p in tune_state_files(exp / "trials").items()}})
    return exp


def refusal(exp) -> str:
    with pytest.raises(ConfigError) as e:
        verify_experiment(exp, "trials", extra=("tune-spec.json",))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_state_files_are_tunes_top_level_json_and_pkl_and_every_pkl(experiment):
    assert set(tune_state_files(experiment / "trials")) == set(STATE)


def test_the_manifest_holds_each_files_sha256_and_an_untouched_experiment_verifies(experiment):
    doc = json.loads((experiment / SIGNATURE_FILE).read_text())
    want = hashlib.sha256((experiment / "trials" / "tuner.pkl").read_bytes()).hexdigest()
    assert doc["files"]["trials/tuner.pkl"] == [want]
    assert set(doc["files"]) == {"tune-spec.json", *(f"trials/{r}" for r in STATE)}
    verify_experiment(experiment, "trials", extra=("tune-spec.json",))


def test_a_tampered_pickle_is_refused_before_it_is_loaded(experiment, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (experiment / "trials" / "tuner.pkl").write_bytes(pickle.dumps(Payload()))
    msg = refusal(experiment)
    assert "tuner.pkl: changed since the sweep signed it" in msg
    assert not marker.exists()


@pytest.mark.parametrize("where", ["trials/callback-states-x.pkl", "trials/t1/error.pkl", "cache/x.pkl",
                                   "trials/experiment_state-2099-01-01_00-00-00.json"])
def test_a_state_file_the_sweep_did_not_write_is_refused(experiment, where):
    (experiment / where).parent.mkdir(parents=True, exist_ok=True)
    (experiment / where).write_bytes(pickle.dumps(1))
    assert f"{where.split('/')[-1]}: not signed by the sweep" in refusal(experiment)


def test_a_missing_or_forged_signature_is_refused(experiment):
    sig = experiment / SIGNATURE_FILE
    doc = json.loads(sig.read_text())
    (experiment / "trials" / "tuner.pkl").write_bytes(b"evil")
    doc["files"]["trials/tuner.pkl"] = [hashlib.sha256(b"evil").hexdigest()]  # no key: the MAC stays old
    sig.write_text(json.dumps(doc))
    assert "does not verify with the key from $UNIBCT_RAY_TUNE_KEY" in refusal(experiment)
    sig.unlink()
    assert f"{SIGNATURE_FILE}: missing" in refusal(experiment)


def test_another_key_does_not_verify(experiment, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "another-key-0123456789")
    assert "does not verify" in refusal(experiment)


def test_each_saved_version_verifies_so_a_kill_mid_upload_resumes(experiment):
    """Tune uploads file by file after a save: DIR may hold one file at the previous version."""
    state = experiment / "trials" / "experiment_state-2026-01-01_00-00-00.json"
    old = state.read_bytes()
    for i in range(3):
        state.write_bytes(pickle.dumps({"save": i}))
        sign_files(experiment, {f"trials/{state.name}": state})
    state.write_bytes(old)
    verify_experiment(experiment, "trials", extra=("tune-spec.json",))


def test_the_key_file_is_created_once_with_mode_0600_and_refused_when_others_can_read_it(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = key_file()
    assert path == tmp_path / ".config" / "unibct-ray" / "tune.key"
    with pytest.raises(ConfigError, match="no tune key"):
        load_key(create=False)  # a resume never makes a new key
    key, where = load_key(create=True)
    assert where == str(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(key) == 64
    assert load_key(create=True)[0] == key
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError) as e:
        load_key(create=True)
    assert str(e.value) == f"{path}: mode 0640: a tune key that group or others can read or write is refused " \
                           f"(chmod 600 {path})"


def test_a_short_key_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ConfigError, match=r"\$UNIBCT_RAY_TUNE_KEY: the key must be at least 16"):
        load_key(create=True)
