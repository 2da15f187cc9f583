from broker.redis_server import redacted


def test_passwords_never_printed():
    assert redacted("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://user:pw@host:6380/0") == "rediss://user:***@host:6380/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
