"""convstack/bench/peer.py without installing anything: where the peer's venv lives, what it
installs, and when a cached one is reused. (`make bench-peer` runs the peer itself: its venv
takes minutes to make, too long for a test.)"""

from __future__ import annotations

from convstack.bench import peer


def test_the_venv_is_cached_outside_the_clone_with_kserve_tensorflow_and_old_protobuf(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert peer.venv_dir() == tmp_path / "convstack" / f"peer-kserve-{peer.KSERVE_VERSION}"
    assert peer.requirements("2.21.0") == ["kserve==0.21.0", "tensorflow==2.21.0", "protobuf<7"]


def test_a_cached_venv_is_reused_only_for_the_same_requirements(tmp_path):
    wanted = peer.requirements("2.21.0")
    assert not peer.venv_is_ready(tmp_path, wanted)  # no python
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    assert not peer.venv_is_ready(tmp_path, wanted)  # no stamp: half made
    (tmp_path / peer.STAMP).write_text("\n".join(wanted))
    assert peer.venv_is_ready(tmp_path, wanted)
    assert not peer.venv_is_ready(tmp_path, peer.requirements("2.22.0"))


def test_the_model_script_is_shipped_beside_the_module():
    text = peer.MODEL_SCRIPT.read_text()
    assert "class SavedModelPredictor(Model)" in text and "gc.freeze()" in text
