"""kombu's Redis transport, hardened: a message that is not valid JSON, pushed straight onto a queue,
is logged and dropped instead of killing the worker; and acknowledging rides out a full Redis. The same
for kombu's Sentinel transport (`SentinelTransport`).

Stock kombu decodes the envelope inside its BRPOP handler; a `JSONDecodeError` there escapes to Celery's
consumer as an "Unrecoverable error" and the whole worker exits (tests/integration/test_bad_input.py
shows it). Garbage carries no task id to fail, so it is dropped with its first bytes logged; a well-formed
envelope with a bad body still reaches the task, which fails the job with the reason."""

from __future__ import annotations

import logging
from queue import Empty

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from broker.fairshare import HOLD_HEADER, hold_message
from broker.messages import COUNT_HEADER
from broker.position import push_counted
from broker.retry import redis_full, retry_while

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """Acknowledging a message is a MULTI of deletions that a full Redis refuses whole: retried until memory
    returns, instead of the worker exiting with "Unrecoverable error"."""

    def ack(self, delivery_tag):  # type: ignore[no-untyped-def]
        return retry_while(lambda: kombu_redis.QoS.ack(self, delivery_tag), redis_full, log, "acknowledge a message")

    def restore_unacked(self, client=None):  # type: ignore[no-untyped-def]
        """kombu puts a closing channel's unacknowledged messages back through a client made from the
        channel's connection, which is already gone when the channel closes because Redis went away
        (`AttributeError: 'NoneType' object has no attribute 'hostname'`, and the worker exits — seen in
        tests/faults/test_redis_restart.py). Then they are left where they are, in kombu's unacked hash:
        its visibility-timeout restore and the beat's lost-delivery sweep put them back."""
        try:
            return super().restore_unacked(client)
        except AttributeError as exc:
            if getattr(self.channel.connection, "client", None) is not None:
                raise
            log.warning("unacknowledged messages left for redelivery: the connection closed under them (%s)", exc)
            return []


BANDS = ("interactive", "standard", "background", "improve")


def drain_order(queue: str) -> tuple[int, int]:
    """Where a queue goes in a worker's BRPOP: strongest band first, a worker's own `<queue>@<worker>` just
    before the shared one (`broker.app.workload_queues`); anything else last, in the order it came."""
    shared, own, _ = queue.partition("@")
    band = shared.rpartition(".")[2]
    return (BANDS.index(band) if band in BANDS else len(BANDS), 0 if own else 1)


class HardenedReads:
    """Garbage on a queue is logged and dropped (mixed into the plain and the Sentinel channel); and the
    queues are read in strict priority order whatever order they were added in. kombu appends a queue a
    worker starts consuming again (`add_consumer`, after an operator's pause) at the end of its BRPOP list,
    which would put a resumed interactive queue behind background work."""

    @property
    def active_queues(self):  # type: ignore[no-untyped-def]
        return sorted(super().active_queues, key=drain_order)

    def _brpop_read(self, **options):  # type: ignore[no-untyped-def]
        try:
            return super()._brpop_read(**options)
        except (ValueError, UnicodeDecodeError) as exc:   # json.JSONDecodeError is a ValueError
            log.error("dropped a message that is not a valid JSON envelope: %s", exc)
            raise Empty() from None

    def _get(self, queue):  # type: ignore[no-untyped-def]
        try:
            return super()._get(queue)
        except (ValueError, UnicodeDecodeError) as exc:
            log.error("dropped a message on %s that is not a valid JSON envelope: %s", queue, exc)
            raise Empty() from None


class HeldPuts:
    """Fair share (`broker.fairshare`): a message whose headers carry `arbiter-hold` is put on its tenant's
    held list for the band — with the ring, the held count and the record's mark, in one Lua step that then
    feeds the band up to its target — instead of kombu's LPUSH onto the band's queue. Celery built it for that
    queue; it moves there, bytes unchanged, when the tenant's turn comes."""

    def _put(self, queue, message, **kwargs):  # type: ignore[no-untyped-def]
        headers = message.get("headers") or {}
        hold = headers.get(HOLD_HEADER)
        count = headers.get(COUNT_HEADER)
        if count and not hold:   # kombu's LPUSH, with the queue's push count and the job's place in it
            stored = {**message, "headers": {k: v for k, v in headers.items() if k != COUNT_HEADER}}
            with self.conn_or_acquire() as client:
                push_counted(client, self._q_for_pri(queue, self._get_message_priority(message, reverse=False)),
                             count, dumps(stored))
            return None
        if not hold:
            return super()._put(queue, message, **kwargs)
        # the header is an instruction to this transport, not part of the job: the message is stored
        # without it (~600 bytes less in every held, queued and unacknowledged copy, and to decode)
        stored = {**message, "headers": {k: v for k, v in headers.items() if k != HOLD_HEADER}}
        with self.conn_or_acquire() as client:
            hold_message(client, hold, dumps(stored))
        return None


class Channel(HeldPuts, HardenedReads, kombu_redis.Channel):
    QoS = QoS


class SentinelChannel(HeldPuts, HardenedReads, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (`sentinel://...` with `master_name` in the transport options), hardened alike.
    Its connections are redis-py's own: a command in flight when the primary dies meets redis/redis-py#3874
    (see `broker.redis_url.ResolvingConnection`) until kombu's publish retry revives the channel, whose new
    connections ask the sentinels."""

    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
