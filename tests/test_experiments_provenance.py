"""experiments/provenance.py: the data digest, git state, package versions and the same-data check that every
experiment JSON records (session 8: mnist1d generated different data on a new machine)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import provenance  # noqa: E402


def _arrays():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 10, 6).astype(np.int32),
          rng.normal(size=(3, 4)).astype(np.float32), rng.integers(0, 10, 3).astype(np.int32))


def _reference(*arrays) -> str:
  """SHA-256 of the concatenated C-order bytes, written independently of the module."""
  return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


# ------------------------------------------------------------------------------------------------
# data_digest


def test_digest_matches_reference_and_is_stable():
  a = _arrays()
  d = provenance.data_digest(*a)
  assert d == _reference(*a) and len(d) == 64
  assert provenance.data_digest(*[x.copy() for x in a]) == d                 # same values, new buffers
  assert provenance.data_digest(*[jnp.asarray(x) for x in a]) == d           # jax arrays hash the same
  assert provenance.data_digest(np.asfortranarray(a[0]), *a[1:]) == d        # C order, whatever the layout


@pytest.mark.parametrize("which", range(4))
def test_digest_changes_when_one_element_changes(which):
  a = [x.copy() for x in _arrays()]
  d0 = provenance.data_digest(*a)
  rng = np.random.default_rng(which)
  for _ in range(5):
    b = [x.copy() for x in a]
    flat = b[which].reshape(-1)
    i = int(rng.integers(flat.size))
    flat[i] = flat[i] + (1 if b[which].dtype.kind == "i" else np.float32(1e-6) * max(1.0, abs(flat[i])))
    assert provenance.data_digest(*b) != d0, (which, i)
  assert provenance.data_digest(*a) == d0                                    # nothing changed: same digest


def test_digest_order_and_dtype_sensitivity():
  x = np.arange(6, dtype=np.int32)
  y = np.arange(6, 12, dtype=np.int32)
  # order of the arguments matters
  assert provenance.data_digest(x, y) != provenance.data_digest(y, x)
  # a cast that changes the bytes changes the digest
  assert provenance.data_digest(x) != provenance.data_digest(x.astype(np.int64))
  assert provenance.data_digest(x.astype(np.float32)) != provenance.data_digest(x.astype(np.float64))
  assert provenance.data_digest(x) != provenance.data_digest(x.astype(np.float32))
  # bytes only (stated in the docstring): shape, a same-bytes dtype and the split between arguments do not
  assert provenance.data_digest(x) == provenance.data_digest(x.reshape(2, 3))
  assert provenance.data_digest(x) == provenance.data_digest(x.view(np.uint32))
  assert provenance.data_digest(x, y) == provenance.data_digest(np.concatenate([x, y]))


def test_digest_of_text_and_bytes():
  s = "HloModule m, entry é"
  b = s.encode("utf-8")
  assert provenance.data_digest(s) == provenance.data_digest(b) == hashlib.sha256(b).hexdigest()
  assert provenance.data_digest(b) == provenance.data_digest(np.frombuffer(b, np.uint8))
  assert provenance.data_digest("ab", "c") != provenance.data_digest("ac", "b")
  assert provenance.data_digest("ab", "c") == provenance.data_digest("abc")  # bytes only, as for arrays
  assert provenance.data_digest(b + b"\0") != provenance.data_digest(b)     # a trailing zero byte counts


def test_digest_bad_input():
  with pytest.raises(ValueError, match="at least one array"):
    provenance.data_digest()
  with pytest.raises(ValueError, match="object"):
    provenance.data_digest(np.array([{"a": 1}], dtype=object))


# ------------------------------------------------------------------------------------------------
# git_state


def _git(repo, *args):
  subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                 cwd=repo, check=True, capture_output=True)


def test_git_state_outside_a_repository(tmp_path, monkeypatch):
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
  monkeypatch.delenv("MLSYS_JAX_GIT_REV", raising=False)
  assert provenance.git_state(tmp_path) == {"git_rev": None, "git_dirty": None}
  assert provenance.git_state(tmp_path / "missing") == {"git_rev": None, "git_dirty": None}


def test_git_state_without_git(monkeypatch):
  monkeypatch.setenv("PATH", "")
  monkeypatch.delenv("MLSYS_JAX_GIT_REV", raising=False)
  assert provenance.git_state(ROOT) == {"git_rev": None, "git_dirty": None}


def test_git_state_falls_back_to_the_copiers_record(tmp_path, monkeypatch):
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
  monkeypatch.setenv("MLSYS_JAX_GIT_REV", "ab" * 20)
  monkeypatch.setenv("MLSYS_JAX_GIT_DIRTY", "1")
  assert provenance.git_state(tmp_path) == {"git_rev": "ab" * 20, "git_dirty": True}
  monkeypatch.setenv("MLSYS_JAX_GIT_DIRTY", "maybe")   # unreadable flag: unknown, not False
  assert provenance.git_state(tmp_path) == {"git_rev": "ab" * 20, "git_dirty": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_revision_and_dirty_flag(tmp_path, monkeypatch):
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
  repo = tmp_path / "r"
  (repo / "lib").mkdir(parents=True)
  (repo / "lib" / "a.py").write_text("x = 1\n")
  (repo / "other.txt").write_text("o\n")
  _git(repo, "init", "-q")
  _git(repo, "add", "lib/a.py", "other.txt")
  _git(repo, "commit", "-q", "-m", "c")
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
  assert provenance.git_state(repo) == {"git_rev": head, "git_dirty": False}
  (repo / "other.txt").write_text("changed\n")
  assert provenance.git_state(repo) == {"git_rev": head, "git_dirty": True}
  assert provenance.git_state(repo, ["lib"])["git_dirty"] is False           # the change is outside lib/
  (repo / "lib" / "new.py").write_text("")                                   # untracked counts
  assert provenance.git_state(repo, ["lib"])["git_dirty"] is True
  # record's script path joins the checked paths
  assert provenance.record(script=repo / "other.txt", code=(), repo_dir=repo, packages=[])["git_dirty"] is True
  assert provenance.record(code=("lib/a.py",), repo_dir=repo, packages=[])["git_dirty"] is False


# ------------------------------------------------------------------------------------------------
# package_versions, record, check_same_data


def test_package_versions():
  v = provenance.package_versions(["numpy", "no-such-distribution-xyz"])
  assert v == {"numpy": np.__version__, "no-such-distribution-xyz": None}
  with pytest.raises(TypeError, match="list of names"):
    provenance.package_versions("numpy")


def test_record_fields(monkeypatch):
  monkeypatch.setattr(provenance, "_AT_IMPORT", provenance.git_state(provenance.ROOT))   # HEAD has not moved
  a = _arrays()
  r = provenance.record(data_arrays=a, extra={"data": "four arrays"})
  assert list(r) == ["data_sha256", "git_rev", "git_dirty", "versions", "data"]
  assert r["data_sha256"] == _reference(*a) and r["data"] == "four arrays"
  assert r["versions"]["numpy"] == np.__version__ and set(r["versions"]) == set(provenance.PACKAGES)
  json.dumps(r)                                                               # JSON-serialisable
  assert provenance.record()["data_sha256"] is None
  assert provenance.record(data_arrays=())["data_sha256"] is None
  with pytest.raises(ValueError, match="overwrite"):
    provenance.record(extra={"git_rev": "x"})


def test_record_names_the_revision_the_run_started_from(monkeypatch):
  now = provenance.git_state(provenance.ROOT)["git_rev"]
  if now is None:
    pytest.skip("needs the checkout's git")
  monkeypatch.setattr(provenance, "_AT_IMPORT", {"git_rev": "0" * 40, "git_dirty": False})   # HEAD moved since
  r = provenance.record()
  assert r["git_rev"] == now and r["git_rev_at_start"] == "0" * 40
  monkeypatch.setattr(provenance, "_AT_IMPORT", {"git_rev": now, "git_dirty": False})
  assert "git_rev_at_start" not in provenance.record()
  with pytest.raises(ValueError, match="overwrite"):
    provenance.record(extra={"git_rev_at_start": "x"})


def test_check_same_data():
  a, b = "a" * 64, "b" * 64
  assert provenance.check_same_data({"data_sha256": a}, {"provenance": {"data_sha256": a}}) is True
  assert provenance.check_same_data({"data_sha256": a}, {"accuracy": {}}) is False    # a JSON from before
  assert provenance.check_same_data(None, {"data_sha256": a}) is False
  with pytest.raises(ValueError) as e:
    provenance.check_same_data({"provenance": {"data_sha256": a}}, {"provenance": {"data_sha256": b}},
                               names=("run1.json", "run2.json"))
  assert a in str(e.value) and b in str(e.value) and "run1.json" in str(e.value) and "run2.json" in str(e.value)
  with pytest.raises(TypeError):
    provenance.check_same_data("x", {})


# ------------------------------------------------------------------------------------------------
# The scripts: compressed_adam's --merge, and one cheap script's JSON end to end.


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def test_compressed_adam_merge_refuses_other_data(tmp_path):
  def run(name, digest, arm):
    d = {"seeds": [0, 1, 2], "compressors": [arm.split()[0]],
         "accuracy": {"adam": [0.90, 0.80, 0.85], arm: [0.88, 0.79, 0.86]},
         "bytes_per_worker": {"adam": [4.0] * 3, arm: [1.0] * 3}, "provenance": {"data_sha256": digest}}
    (tmp_path / name).write_text(json.dumps(d))
    return str(tmp_path / name)

  same = [run("a.json", "1" * 64, "topk 0.01 chain"), run("b.json", "1" * 64, "sidco 0.01 chain")]
  other = [same[0], run("c.json", "2" * 64, "sidco 0.01 chain")]
  code = (f"import sys; sys.path.insert(0, {str(ROOT / 'experiments')!r}); import compressed_adam as ca\n"
          f"ca.merge({same!r}, {str(tmp_path / 'm.json')!r})\n"
          f"ca.merge({other!r}, {str(tmp_path / 'n.json')!r})\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
  assert p.returncode != 0 and "ValueError" in p.stderr
  assert "1" * 64 in p.stderr and "2" * 64 in p.stderr and "c.json" in p.stderr, p.stderr[-2000:]
  merged = json.loads((tmp_path / "m.json").read_text())
  assert set(merged["accuracy"]) == {"adam", "topk 0.01 chain", "sidco 0.01 chain"}
  assert merged["provenance"] == {"data_sha256": "1" * 64}
  assert not (tmp_path / "n.json").exists()


def test_video_eval_json_carries_provenance(tmp_path):
  """The cheapest script with a data set (synthetic frames): its JSON's digest is the frames' digest."""
  args = ["--size=8", "--tile=8", "--frames=2", "--seeds=1", "--activity=static", "--channels=2",
          "--timing_repeats=0", f"--out_dir={tmp_path}"]
  p = subprocess.run([sys.executable, str(ROOT / "experiments" / "video_eval.py"), *args], capture_output=True,
                     text=True, env=_env(), timeout=300, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  prov = json.loads((tmp_path / "video_eval.json").read_text())["provenance"]
  from mlsys_jax.infer import video
  assert prov["data_sha256"] == _reference(video.synthetic_video(0, 2, 8, 8, 3, "static"))
  assert prov["git_rev"] == provenance.git_state(ROOT)["git_rev"]
  assert prov["versions"] == provenance.package_versions()
