"""ARBITER_REDIS_URL: a plain Redis or a Sentinel group (broker/redis_url.py), what each process builds of it,
and passwords never printed."""

import pytest
from redis.sentinel import SentinelConnectionPool

from broker.app import create_app
from broker.redis_server import connect
from broker.redis_url import parse_redis_url, redacted
from broker.settings import Settings


def test_passwords_never_printed():
    assert redacted("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://user:pw@host:6380/0") == "rediss://user:***@host:6380/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379/0") == \
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379/0"


SENTINELS = "sentinel://h1:26379;sentinel://h2:26380;sentinel://h3/2"


def test_plain_url_passes_through():
    t = parse_redis_url("redis://:pw@redis:6379/3")
    assert not t.is_sentinel and t.broker_url() == "redis://:pw@redis:6379/3" and t.transport_options() == {}


def test_sentinel_url_lists_every_sentinel_with_default_port_and_db():
    t = parse_redis_url(SENTINELS + "?master_name=arbiter")
    assert t.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (t.master_name, t.db, t.password) == ("arbiter", 2, None)
    assert t.broker_url() == "sentinel://h1:26379/2;sentinel://h2:26380/2;sentinel://h3:26379/2"   # no query
    assert t.transport_options()["master_name"] == "arbiter"


def test_master_name_from_the_setting_and_credentials_on_every_part():
    t = parse_redis_url("sentinel://:s3cret@10.0.0.1;sentinel://10.0.0.2:26380", master_name="mymaster")
    assert (t.master_name, t.password) == ("mymaster", "s3cret")
    assert t.broker_url() == "sentinel://:s3cret@10.0.0.1:26379/0;sentinel://:s3cret@10.0.0.2:26380/0"
    assert "s3cret" not in t.describe()


@pytest.mark.parametrize("url, name, needle", [
    (SENTINELS, "", "ARBITER_REDIS_MASTER_NAME"),                                  # no primary named
    (SENTINELS + "?master_name=a", "b", "different master names"),
    ("sentinel://h1/1;sentinel://h2/2?master_name=a", "", "different database numbers"),
    ("redis://h1:6379;redis://h2:6379", "", "only Sentinel URLs"),
    ("sentinel://h1:26379;redis://h2:6379", "", "mixes sentinel:// with redis://"),
    ("redis://h1:6379/0", "mymaster", "not a Sentinel URL"),
    ("sentinel://h1/x?master_name=a", "", "is not a number"),
    ("sentinel://h1?master_name=a&foo=1", "", "unknown option(s) foo"),
    ("sentinel://h1:99999?master_name=a", "", "sentinel part"),
    ("", "", "is empty"),
])
def test_bad_urls_are_refused_naming_the_setting(url, name, needle):
    with pytest.raises(ValueError, match="ARBITER_REDIS") as exc:
        parse_redis_url(url, name)
    assert needle in str(exc.value)


def test_settings_refuse_a_zero_wait():
    with pytest.raises(ValueError, match="redis_wait_ms"):
        Settings(redis_wait_ms=0)


def test_sentinel_client_is_a_master_for_client_with_our_retry():
    r = connect(SENTINELS, master_name="arbiter")
    pool = r.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "arbiter"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["retry"].get_retries() >= 30        # rides out a failover (~seconds)
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [26379, 26380,
                                                                                                      26379]


def test_celery_gets_the_sentinel_transport_backend_and_master_name():
    app = create_app(Settings(redis_url=SENTINELS, redis_master_name="arbiter"))
    try:
        conn = app.connection_for_write()
        assert conn.transport_cls == "broker.transport:SentinelTransport"
        assert conn.alt == ["sentinel://h1:26379/2", "sentinel://h2:26380/2", "sentinel://h3:26379/2"]
        for opts in (app.conf.broker_transport_options, app.conf.result_backend_transport_options):
            assert opts["master_name"] == "arbiter" and opts["queue_order_strategy"] == "priority"
        from broker.backend import SentinelBackend

        assert isinstance(app.backend, SentinelBackend)
        assert [(h["host"], h["port"]) for h in app.backend.connparams["hosts"]] == [
            ("h1", 26379), ("h2", 26380), ("h3", 26379)]
    finally:
        app.close()


def test_celery_plain_redis_keeps_the_hardened_transport():
    app = create_app(Settings(redis_url="redis://127.0.0.1:6390/4"))
    try:
        assert app.connection_for_write().transport_cls == "broker.transport:Transport"
        assert "master_name" not in app.conf.broker_transport_options
        assert app.backend.connparams["db"] == 4
    finally:
        app.close()
