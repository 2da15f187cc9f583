"""Signed image URLs: a deployment's own key (a Kubernetes Secret, `ARBITER_GATEWAY_URL_SECRET`) or the one the
first gateway makes and keeps in Redis."""

from arbiter.gateway.signing import UrlSigner


def test_a_given_secret_signs_alike_in_every_gateway_and_is_not_written_to_redis(fake_redis):
    a = UrlSigner(fake_redis, "t:gateway:url_secret", 60, secret="from-a-secret")
    b = UrlSigner(fake_redis, "t:gateway:url_secret", 60, secret="from-a-secret")
    expires, sig = a.sign("job1", now=1000.0)
    assert b.check("job1", expires, sig, now=1001.0) is None
    assert not fake_redis.exists("t:gateway:url_secret")
    other = UrlSigner(fake_redis, "t:gateway:url_secret", 60, secret="another")
    assert other.check("job1", expires, sig, now=1001.0) == "the link's signature does not match"


def test_without_one_the_first_gateway_makes_it_in_redis_and_the_others_read_it(fake_redis):
    a, b = (UrlSigner(fake_redis, "t:gateway:url_secret", 60) for _ in range(2))
    expires, sig = a.sign("job1", now=1000.0)
    assert b.check("job1", expires, sig, now=1001.0) is None and fake_redis.exists("t:gateway:url_secret")
