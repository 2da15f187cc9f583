"""One event reader per process (broker/eventhub.py) on a real Redis: many waiters served by few XREADs, a
waiter who joins while the reader blocks is read at once, and each waiter sees its job's events once, in order."""

import asyncio

import pytest
import redis.asyncio as aioredis

from broker.eventhub import EventHub
from broker.keys import Keys

pytestmark = pytest.mark.integration


def run(coro):
    return asyncio.run(coro)


def test_one_reader_serves_hundreds_of_waiters_each_event_once_in_order(redis_url):
    async def main():
        r, keys = aioredis.Redis.from_url(redis_url), Keys("hubtest")
        hub = EventHub(r, keys)
        subs = [await hub.subscribe(f"job{i}") for i in range(300)]
        for n in range(3):
            pipe = r.pipeline(transaction=False)
            for i in range(300):
                pipe.xadd(keys.job_events(f"job{i}"), {"type": "token", "index": n})
            await pipe.execute()
        got = [[(await s.get(10))[1]["index"] for _ in range(3)] for s in subs]
        assert got == [["0", "1", "2"]] * 300
        assert all(s.queue.empty() for s in subs)
        assert hub.reads < 100          # one XREAD serves every stream with news, not one per waiter
        # a second waiter on the same job, from the start, sees the whole history once
        late = await hub.subscribe("job7")
        assert [(await late.get(10))[1]["index"] for _ in range(3)] == ["0", "1", "2"]
        for s in subs:
            s.close()
        late.close()
        assert hub.subscribers == 0
        await hub.close()
        assert not await r.exists(hub.wake_key)
        await r.aclose()

    run(main())


def test_a_waiter_who_joins_while_the_reader_blocks_is_read_at_once(redis_url):
    async def main():
        r, keys = aioredis.Redis.from_url(redis_url), Keys("hubwake")
        hub = EventHub(r, keys, block_ms=30_000)
        first = await hub.subscribe("quiet")
        await asyncio.sleep(0.3)                 # the reader now blocks on the quiet job's stream alone
        assert hub._blocking
        second = await hub.subscribe("busy")
        await r.xadd(keys.job_events("busy"), {"type": "state", "state": "running"})
        got = await second.get(5.0)              # not after the 30 s block
        assert got is not None and got[1]["state"] == "running"
        first.close()
        second.close()
        await hub.close()
        await r.aclose()

    run(main())


def test_a_subscribe_whose_wake_fails_leaves_no_subscription(redis_url):
    """A waiter that joins while the reader blocks writes a wake; if that write fails (Redis failing over) or
    the caller is cancelled, the caller never gets its subscription, so the hub must not keep it (it stayed in
    every later XREAD, its queue filling, for the life of the process)."""
    async def main():
        r, keys = aioredis.Redis.from_url(redis_url), Keys("hubwake")
        hub = EventHub(r, keys)
        first = await hub.subscribe("a")
        for _ in range(100):                      # until the reader sits in its XREAD
            if hub._blocking:
                break
            await asyncio.sleep(0.01)
        assert hub._blocking
        execute = aioredis.client.Pipeline.execute

        async def failing(self, *args, **kwargs):
            raise aioredis.ConnectionError("failing over")

        aioredis.client.Pipeline.execute = failing
        try:
            with pytest.raises(aioredis.ConnectionError):
                await hub.subscribe("b")
        finally:
            aioredis.client.Pipeline.execute = execute
        assert hub.subscribers == 1 and not hub._woken
        late = await hub.subscribe("c")           # a later waiter wakes the reader again, and is served
        await r.xadd(keys.job_events("c"), {"type": "token", "index": 0})
        assert (await late.get(10))[1]["index"] == "0"
        first.close()
        late.close()
        await hub.close()
        await r.aclose()

    run(main())
