"""Signed tune experiments: an HMAC-SHA256 over the files Ray Tune unpickles when a sweep resumes.

``tune --resume DIR`` hands ``DIR/trials`` to ``Tuner.restore``, and Ray Tune 2.60 deserialises,
from the top level of that folder (it copies every top-level ``.json`` and ``.pkl`` of it before
reading them):

* ``tuner.pkl`` - a cloudpickle of the Tuner (trainable, configs, callbacks, searcher);
* ``experiment_state-<ts>.json`` - JSON whose non-JSON values (trial configs, the controller's
  attributes) are hex-encoded cloudpickles;
* ``search_gen_state-<ts>.json`` - a cloudpickle in spite of its name;
* ``searcher-state-<ts>.pkl`` and ``callback-states-<ts>.pkl`` - pickles.

Loading any of them runs whatever code the bytes ask for, so whoever can write the shared storage
could run code on the head. The sweep therefore signs what it writes: ``DIR/tune-signature.json``
holds a manifest ``{path relative to DIR: [SHA-256, ...]}`` and an HMAC-SHA256 of it under a key
only the user holds. A resume first checks the MAC, then every state file present (the files
above, every ``.pkl`` anywhere under ``DIR`` - Tune also writes a ``params.pkl`` per trial - and
the sweep's recipe ``tune-spec.json``): one that is not in the manifest, or whose digest is not one
the sweep signed, stops the resume with one line naming it, before anything is unpickled.

A path may carry several digests (the newest :data:`KEEP`): Ray Tune uploads its state to
``DIR/trials`` file by file in a background thread after each save, and the sweep signs each save
before that upload starts, so a driver killed mid-upload leaves some files at the previous save's
version. Every version was written by the sweep itself, so any of them may be restored.

The key: ``$UNIBCT_RAY_TUNE_KEY`` if set (at least 16 characters; on a cluster, from a Secret),
else ``~/.config/unibct-ray/tune.key``, 32 random bytes created on first use with mode 0600. A key
file that group or others can read or write, or that another user owns, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from unibct_ray.atomic import atomic_write, temp_name
from unibct_ray.errors import ConfigError

__all__ = ["KEY_ENV", "SIGNATURE_FILE", "KEEP", "key_file", "load_key", "file_digest", "tune_state_files",
           "sign_files", "verify_experiment"]

KEY_ENV = "UNIBCT_RAY_TUNE_KEY"
SIGNATURE_FILE = "tune-signature.json"
#: Digests kept per path: a kill mid-upload leaves files one or two saves behind (see above).
KEEP = 16
_FORMAT = "unibct-ray tune signature 1"
_MIN_KEY = 16


def key_file() -> Path:
    """``~/.config/unibct-ray/tune.key``."""
    return Path.home() / ".config" / "unibct-ray" / "tune.key"


def _create_key_file(path: Path) -> None:
    """A new random key at ``path``, mode 0600 from its first byte; a concurrent creator wins."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never replace a key
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def load_key(*, create: bool) -> tuple[bytes, str]:
    """(key, where it came from). ``create`` makes the key file when neither the environment
    variable nor the file exists (a new sweep); a resume passes False (a new key could not
    verify anything)."""
    env = os.environ.get(KEY_ENV)
    if env is not None:
        if len(env.strip()) < _MIN_KEY:
            raise ConfigError(f"${KEY_ENV}: the key must be at least {_MIN_KEY} characters "
                              "(e.g. the output of `openssl rand -hex 32`)")
        return env.strip().encode(), f"${KEY_ENV}"
    path = key_file()
    if not path.exists():
        if not create:
            raise ConfigError(f"{path}: no tune key (and ${KEY_ENV} is unset), so the experiment's signature "
                              "cannot be checked; resume with the key the sweep was started with")
        _create_key_file(path)
    st = path.stat()
    if st.st_mode & 0o077:
        raise ConfigError(f"{path}: mode {st.st_mode & 0o777:04o}: a tune key that group or others can read or "
                          f"write is refused (chmod 600 {path})")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by this user (uid {os.getuid()}): refused")
    key = path.read_bytes().strip()
    if len(key) < _MIN_KEY:
        raise ConfigError(f"{path}: the key is shorter than {_MIN_KEY} bytes")
    return key, str(path)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tune_state_files(tune_dir: str | os.PathLike) -> dict[str, Path]:
    """{path relative to ``tune_dir``: path} of the files a signature covers in a Ray Tune
    experiment folder: its top-level ``.json``/``.pkl`` files (what ``Tuner.restore`` copies and
    reads) and every ``.pkl`` below it."""
    root = Path(tune_dir)
    if not root.is_dir():
        return {}
    out = {p.name: p for p in root.iterdir() if p.suffix in (".json", ".pkl") and p.is_file()}
    out.update({p.relative_to(root).as_posix(): p for p in root.rglob("*.pkl") if p.is_file()})
    return out


def _mac(key: bytes, files: Mapping[str, list[str]]) -> str:
    body = json.dumps({"format": _FORMAT, "files": files}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _read(exp_dir: Path, key: bytes, where: str) -> dict[str, list[str]]:
    """The verified manifest of ``exp_dir`` ({} when it has no signature yet)."""
    sig = exp_dir / SIGNATURE_FILE
    if not sig.exists():
        return {}
    try:
        doc = json.loads(sig.read_text())
        files, mac = doc["files"], doc["hmac_sha256"]
        ok = (doc.get("format") == _FORMAT and isinstance(files, dict) and isinstance(mac, str)
              and all(isinstance(v, list) and all(isinstance(d, str) for d in v) for v in files.values()))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{sig}: not a tune signature (unreadable or wrong fields)")
    if not hmac.compare_digest(_mac(key, files), mac):
        raise ConfigError(f"{sig}: the signature does not verify with the key from {where} (the manifest was "
                          "changed, or the experiment was signed with another key)")
    return files


def sign_files(exp_dir: str | os.PathLike, files: Mapping[str, str | os.PathLike]) -> None:
    """Add the current digests of ``files`` ({path relative to ``exp_dir``: file to hash}) to the
    experiment's signed manifest and rewrite ``DIR/tune-signature.json`` atomically (only when
    something changed). The file hashed may live elsewhere (Ray Tune's local staging copy of
    what it is about to upload to ``DIR``)."""
    exp_dir = Path(exp_dir)
    key, where = load_key(create=True)
    manifest = _read(exp_dir, key, where)
    changed = not (exp_dir / SIGNATURE_FILE).exists()
    for rel, path in sorted(files.items()):
        d = file_digest(path)
        seen = manifest.setdefault(rel, [])
        if seen and seen[-1] == d:
            continue
        if d in seen:
            seen.remove(d)
        seen.append(d)  # newest last
        del seen[:-KEEP]
        changed = True
    if changed:
        doc = {"format": _FORMAT, "files": manifest, "hmac_sha256": _mac(key, manifest)}
        atomic_write(exp_dir / SIGNATURE_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def verify_experiment(exp_dir: str | os.PathLike, tune_dir: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse (``ConfigError``, one line naming the file) an experiment directory whose state files
    are not exactly ones the sweep signed: a missing or forged signature, a file changed since it
    was signed, or a state file the sweep never wrote. ``tune_dir`` is Ray Tune's folder inside
    ``exp_dir``; ``extra`` names further files (relative to ``exp_dir``) that must be signed when
    present. Reads bytes only: nothing is unpickled here."""
    exp_dir = Path(exp_dir)
    sig = exp_dir / SIGNATURE_FILE
    if not sig.is_file():
        raise ConfigError(f"{sig}: missing: the experiment is not signed, so its Ray Tune state (pickles) is not "
                          "restored; start a new experiment")
    key, where = load_key(create=False)
    manifest = _read(exp_dir, key, where)
    present = {rel: exp_dir / rel for rel in extra if (exp_dir / rel).is_file()}
    present.update({f"{tune_dir}/{rel}": p for rel, p in tune_state_files(exp_dir / tune_dir).items()})
    present.update({p.relative_to(exp_dir).as_posix(): p for p in exp_dir.rglob("*.pkl") if p.is_file()})
    for rel, path in sorted(present.items()):
        if rel not in manifest:
            raise ConfigError(f"{path}: not signed by the sweep (a state file it did not write); nothing of the "
                              "experiment was restored")
        if file_digest(path) not in manifest[rel]:
            raise ConfigError(f"{path}: changed since the sweep signed it; nothing of the experiment was restored")
