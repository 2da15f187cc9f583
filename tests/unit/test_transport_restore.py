"""A channel closing because Redis went away must not kill the worker while kombu restores its unacked
messages (the connection it would build a client from is already gone)."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from broker.transport import QoS


def _qos(client):
    @contextmanager
    def conn_or_acquire(_client=None):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")
        yield  # pragma: no cover

    qos = QoS.__new__(QoS)
    qos.channel = SimpleNamespace(connection=SimpleNamespace(client=client), conn_or_acquire=conn_or_acquire)
    qos._delivered = {"tag": object()}
    return qos


def test_restoring_after_the_connection_closed_leaves_the_messages_for_redelivery():
    assert _qos(client=None).restore_unacked() == []


def test_the_same_error_with_a_live_connection_is_not_hidden():
    with pytest.raises(AttributeError):
        _qos(client=object()).restore_unacked()
