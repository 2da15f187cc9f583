"""Manifests from real safetensors files, and the tiers' fill, eviction, pinning and hash checks."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from cache.manifest import assemble, build_manifest
from cache.pinned import CorruptFragment
from cache.tiers import FileTier


@pytest.fixture
def model_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "origin" / "tiny"
    root.mkdir(parents=True)
    save_file({"unet.w": rng.standard_normal((512, 700)).astype(np.float32),
               "unet.b": np.arange(7, dtype=np.int64)}, str(root / "unet.safetensors"))
    save_file({"vae.w": rng.standard_normal((300, 300)).astype(np.float16)}, str(root / "vae.safetensors"))
    return root


def read_all(root, manifest):
    out = {}
    for f in manifest.fragments:
        with open(root / f.file, "rb") as fh:
            fh.seek(f.offset)
            out[f.sha256] = fh.read(f.size)
    return out


def test_manifest_round_trips_tensors(model_dir):
    m = build_manifest(model_dir, "tiny", "fp32", fragment_mib=1)
    assert m.total_bytes == sum(f.size for f in m.fragments)
    assert len([f for f in m.fragments if f.file == "unet.safetensors"]) == 2     # 1.4 MB in 1 MiB fragments
    tensors = assemble(m, read_all(model_dir, m))
    assert tensors["unet.w"].shape == (512, 700) and tensors["vae.w"].dtype == np.float16
    assert tensors["unet.b"].tolist() == list(range(7))


def test_a_shared_file_gives_the_same_fragments(model_dir, tmp_path):
    other = tmp_path / "origin" / "other"
    other.mkdir()
    (other / "vae.safetensors").write_bytes((model_dir / "vae.safetensors").read_bytes())
    a = build_manifest(model_dir, "tiny", "fp32", fragment_mib=1)
    b = build_manifest(other, "other", "fp32", fragment_mib=1)
    assert {f.sha256 for f in a.fragments if f.file == "vae.safetensors"} == {f.sha256 for f in b.fragments}


def test_tier_evicts_lru_but_never_a_pinned_fragment(tmp_path):
    import hashlib

    tier = FileTier("ram", tmp_path / "t", budget_bytes=3000)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    for sha, blob in zip(shas[:3], blobs[:3], strict=False):
        tier.put(sha, blob)
    pinned = tier.open(shas[0])                 # oldest, but in use
    tier.put(shas[3], blobs[3])                 # needs room: evicts the LRU unpinned one (shas[1])
    assert tier.has(shas[0]) and not tier.has(shas[1]) and tier.has(shas[3])
    assert bytes(pinned.data) == blobs[0]
    pinned.close()
    assert tier.used_bytes() <= 3000


def test_tier_refuses_wrong_bytes_and_detects_corruption(tmp_path):
    import hashlib

    tier = FileTier("disk", tmp_path / "d", budget_bytes=10_000, verify_reads=True)
    blob = b"x" * 100
    sha = hashlib.sha256(blob).hexdigest()
    with pytest.raises(CorruptFragment):
        tier.put(sha, b"y" * 100)
    tier.put(sha, blob)
    tier.path(sha).write_bytes(b"z" * 100)      # bit rot
    with pytest.raises(CorruptFragment):
        tier.open(sha)
    assert not tier.has(sha)                    # dropped, so the next load refetches it


def test_mapped_files_give_the_same_tensors_without_a_copy(model_dir, tmp_path):
    """Each file as one contiguous mapping of its fragment files (tensors spanning two fragments included),
    tensors as views of it, and a fragment with no file behind it (a full tier) copied in."""
    import hashlib

    import torch

    from cache.mapped import map_files, torch_tensors
    from cache.pinned import Pinned

    m = build_manifest(model_dir, "tiny", "fp32", fragment_mib=1)
    blobs = read_all(model_dir, m)
    tier = FileTier("ram", tmp_path / "ram", 1 << 30)
    for sha, blob in blobs.items():
        tier.put(sha, blob)
    pinned = [tier.open(f.sha256) for f in m.fragments]
    pinned[-1] = Pinned(memoryview(blobs[m.fragments[-1].sha256]))     # process memory, no fd
    tensors = torch_tensors(m, map_files(m, pinned))
    expected = assemble(m, blobs)
    for file_tensors in tensors.values():
        for name, t in file_tensors.items():
            assert np.array_equal(t.numpy(), expected[name]), name
    w = tensors["unet.safetensors"]["unet.w"]
    w.mul_(0)                                                           # copy-on-write: the tier is untouched
    assert hashlib.sha256(tier.path(m.fragments[0].sha256).read_bytes()).hexdigest() == m.fragments[0].sha256
    assert w.data_ptr() != 0 and isinstance(w, torch.Tensor)


def test_a_kept_mapping_is_served_again_and_released_for_eviction(tmp_path):
    import hashlib

    tier = FileTier("ram", tmp_path / "t", budget_bytes=2000, keep_mapped_bytes=2000)
    blobs = [bytes([i]) * 1000 for i in range(3)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    tier.put(shas[0], blobs[0])
    first = tier.open(shas[0])
    fd = first.fd
    first.close()
    again = tier.open(shas[0])                  # a lookup: the same mapping, still open
    assert again.fd == fd and list(tier._held) == [shas[0]]
    again.close()
    tier.put(shas[1], blobs[1])
    tier.open(shas[1]).close()                  # both kept mapped, so both pinned
    tier.put(shas[2], blobs[2])                 # needs room: our own kept mappings are given up, LRU evicted
    assert not tier.has(shas[0]) and tier.has(shas[1]) and tier.has(shas[2])
