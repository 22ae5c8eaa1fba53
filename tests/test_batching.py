"""Dynamic batching (dgmood.app.batching): concurrent requests share one call, each gets its own results back."""

import asyncio
import threading

import numpy as np
import pytest

from dgmood.app.batching import Batcher, QueueFull


class Recorder:
    """A batch scorer that records the size of each call and answers each image with its first pixel."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls, self.gate = [], gate

    def __call__(self, x):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(len(x))
        return [float(v) for v in x.reshape(len(x), -1)[:, 0]]


def images(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, np.float32)


async def request(batcher, x, delay=0.0):
    with batcher.admit() as submit:
        await asyncio.sleep(delay)  # receiving and decoding
        return await submit(x)


def test_concurrent_requests_share_a_call_and_get_their_own_results():
    async def main():
        batcher = Batcher(Recorder(), max_batch=64, max_wait_ms=50)
        sizes = [1, 3, 1, 2, 1]
        got = await asyncio.gather(*(request(batcher, images(i, n), 0.001 * i) for i, n in enumerate(sizes)))
        batcher.close()
        return batcher, got, sizes

    batcher, got, sizes = asyncio.run(main())
    assert got == [[float(i)] * n for i, n in enumerate(sizes)]
    assert batcher.score.calls == [sum(sizes)] and batcher.batches == 1 and batcher.images == sum(sizes)


def test_batches_stop_at_max_batch_and_a_lone_request_does_not_wait():
    async def main():
        batcher = Batcher(Recorder(), max_batch=4, max_wait_ms=10_000)
        got = await asyncio.gather(*(request(batcher, images(i)) for i in range(10)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        alone = await request(batcher, images(7))  # nothing else arriving: scored at once, not after 10 s
        batcher.close()
        return batcher, got, alone, loop.time() - start

    batcher, got, alone, seconds = asyncio.run(main())
    assert got == [[float(i)] for i in range(10)] and alone == [7.0] and seconds < 2
    assert batcher.score.calls[:3] == [4, 4, 2] and max(batcher.score.calls) <= 4


def test_a_full_queue_refuses_and_an_error_reaches_only_its_request():
    gate = threading.Event()

    def failing(x):  # fails on any batch holding an image of 2s
        if (x == 2).any():
            raise RuntimeError("network pass failed")
        return [float(v) for v in x.reshape(len(x), -1)[:, 0]]

    async def main():
        batcher = Batcher(Recorder(gate), max_batch=8, max_wait_ms=1, max_queue=2)
        first = asyncio.ensure_future(request(batcher, images(1)))
        second = asyncio.ensure_future(request(batcher, images(2)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="busy: 2 requests queued"):
            with batcher.admit():
                pass
        gate.set()
        done = await asyncio.gather(first, second)
        with batcher.admit():  # a place is free again once answered
            pass
        batcher.close()
        broken = Batcher(failing, max_wait_ms=20)
        mixed = await asyncio.gather(*(request(broken, images(v)) for v in (1, 2, 3)), return_exceptions=True)
        after = await request(broken, images(4))  # the worker goes on
        broken.close()
        return done, mixed, after, batcher, broken

    done, mixed, after, batcher, broken = asyncio.run(main())
    assert done == [[1.0], [2.0]] and batcher.admitted == 0 and batcher.arriving == 0
    # the batch of three failed; scored again one by one, only the request holding 2s gets the error
    assert mixed[0] == [1.0] and isinstance(mixed[1], RuntimeError) and mixed[2] == [3.0] and after == [4.0]
    assert broken.batches == 3  # the two that succeeded alone, then the lone fourth
