"""Local trust of the fragment cache's tiers (issue 30, point 7), on real Redis and real files: a tier directory
another user owns or may write into is refused; bytes planted under a fragment's name are caught by the check
every read from another process's (or a replaced) file gets, and fetched again."""

import os

import numpy as np
import pytest
import redis

from broker.keys import Keys
from broker.settings import Settings
from cache.loader import FragmentCache, from_settings
from cache.origin import LocalOrigin
from cache.tiers import FileTier, UnsafeTier
from tests.support.cache import random_model

pytestmark = pytest.mark.integration


def make_cache(url, tmp_path, node):
    return FragmentCache(redis.Redis.from_url(url), Keys(), node, FileTier("ram", tmp_path / "shm", 64 << 20),
                         FileTier("disk", tmp_path / "disk", 256 << 20, verify_reads=True))


def test_a_tier_directory_others_can_write_or_own_is_refused(tmp_path, redis_url):
    fresh = tmp_path / "new" / "ram"
    FileTier("ram", fresh, 1 << 20)
    assert oct(os.stat(fresh).st_mode & 0o777) == "0o700"                 # created this user's own
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o1777)                                               # /dev/shm-like: anyone may write
    with pytest.raises(UnsafeTier, match=r"writable by others \(mode 1777\).*chmod 700"):
        FileTier("ram", shared, 1 << 20)
    settings = Settings(redis_url=redis_url, cache_ram_dir=str(shared), cache_disk_dir=str(tmp_path / "d"))
    with pytest.raises(UnsafeTier, match="ARBITER_CACHE_RAM_DIR"):         # what a worker starting on it meets
        from_settings(redis.Redis.from_url(redis_url), settings)
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(UnsafeTier, match="not a plain directory"):
        FileTier("ram", link, 1 << 20)
    if os.geteuid() == 0:                                                  # root can hand a directory away
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UnsafeTier, match="owned by uid 65534"):
            FileTier("disk", theirs, 1 << 20)


def test_bytes_planted_under_a_fragments_name_are_caught_and_fetched_again(redis_url, tmp_path):
    root, manifest, weights = random_model(tmp_path, "tiny-llm", seed=3, layers=12, cols=256)
    writer = make_cache(redis_url, tmp_path, "plant")
    writer.load(manifest, LocalOrigin(root))
    writer.flush()
    victim, other = manifest.fragments[0], manifest.fragments[1]
    # planted in place: the same inode's bytes changed (its checksum file left as it was)
    with open(writer.ram.path(victim.sha256), "r+b") as f:
        f.write(b"\xff" * victim.size)
    # planted as a new file under another fragment's name, its checksum file removed
    writer.ram.path(other.sha256).unlink()
    writer.ram._checksum_path(other.sha256).unlink(missing_ok=True)
    writer.ram.path(other.sha256).write_bytes(b"\x01" * other.size)
    reader = make_cache(redis_url, tmp_path, "plant")                      # another worker process on the node
    got = reader.load(manifest, LocalOrigin(root))
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
    reader.flush()
    stats = reader.r.hgetall(Keys().cache_stats("plant"))
    assert float(stats[b"ram_corrupt"]) == 2
    # the writer itself trusts only the very file it wrote: a file put in its place is checked too
    writer.ram.release_held()
    writer.ram.path(victim.sha256).unlink()
    writer.ram.path(victim.sha256).write_bytes(b"\x02" * victim.size)
    got = writer.load(manifest, LocalOrigin(root))
    assert all(np.array_equal(got[k], v) for k, v in weights.items())
