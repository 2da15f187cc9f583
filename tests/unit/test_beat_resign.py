"""broker/lua/beat_resign.lua on fakeredis: a stopping leader lets go of its own lock only, and wakes a standby."""

from broker.keys import Keys
from broker.lua import load

KEYS = Keys()
ARGS = [KEYS.beat_lock(), KEYS.beat_policy(), KEYS.beat_handover()]


def test_a_leader_lets_go_of_its_lock_and_wakes_a_standby(fake_redis):
    resign = fake_redis.register_script(load("beat_resign", "broker.lua"))
    fake_redis.set(KEYS.beat_lock(), "me", px=2000)
    fake_redis.set(KEYS.beat_policy(), "arbiter", px=2000)
    assert resign(keys=ARGS, args=["me", 2000]) == 1
    assert fake_redis.get(KEYS.beat_lock()) is None and fake_redis.get(KEYS.beat_policy()) is None
    assert fake_redis.lrange(KEYS.beat_handover(), 0, -1) == [b"me"]
    assert 0 < fake_redis.pttl(KEYS.beat_handover()) <= 2000     # no standby: it goes by itself


def test_a_lock_another_beat_took_is_left_alone(fake_redis):
    resign = fake_redis.register_script(load("beat_resign", "broker.lua"))
    fake_redis.set(KEYS.beat_lock(), "successor", px=2000)
    fake_redis.set(KEYS.beat_policy(), "arbiter", px=2000)
    assert resign(keys=ARGS, args=["me", 2000]) == 0
    assert fake_redis.get(KEYS.beat_lock()) == b"successor" and fake_redis.get(KEYS.beat_policy()) == b"arbiter"
    assert not fake_redis.exists(KEYS.beat_handover())
