"""What bench/overload.py watches beside its load: the server's resident memory, its
health from a process of its own, and how late the bench's own event loop runs.

    python bench/_watch.py ADDRESS   # HealthProbe's child: Checks until stdin closes
"""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
import threading
import time

from _proc import status_mib


class ResidentMemory:
    """The server's resident memory (MiB), sampled every 50 ms while in the ``with``."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self.before = self.now()

    def now(self) -> float:
        return status_mib(self.pid, "VmRSS")

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> ResidentMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class HealthProbe:
    """A health Check every 100 ms from a process of its own (as a kubelet probe is): its
    latencies are the server's, not this process's event loop's, which the load may
    saturate. ``with HealthProbe(address) as probe: ...``, then ``probe.seconds``; a failed
    check counts as its time to fail and in ``probe.failed``."""

    def __init__(self, address: str) -> None:
        self.address, self.seconds, self.failed = address, [], 0

    def __enter__(self) -> HealthProbe:
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":  # connected, first check answered
            self.process.kill()
            raise RuntimeError(f"the health probe could not Check {self.address} (its error above)")
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.process.communicate(timeout=60)  # closing stdin stops it
        result = json.loads(out)
        self.seconds, self.failed = result["seconds"], result["failed"]


def probe_health(address: str, every: float = 0.1) -> None:
    """``python bench/_watch.py ADDRESS``: Check until stdin closes; print the latencies as JSON."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        check, request = health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest()
        check(request, timeout=30)
        print("ready", flush=True)
        seconds, failed = [], 0
        while not select.select([sys.stdin], [], [], every)[0]:
            start = time.perf_counter()
            try:
                check(request, timeout=10)
            except grpc.RpcError:
                failed += 1
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "failed": failed}))


async def loop_lag(stop: asyncio.Event, tick: float = 0.02) -> list[float]:
    """How late this process's event loop wakes a sleeper (s), every ``tick`` until ``stop``:
    where it lags, the client, not the server, is what the overload figures measure."""
    lates = []
    while not stop.is_set():
        due = time.perf_counter() + tick
        await asyncio.sleep(tick)
        lates.append(max(0.0, time.perf_counter() - due))
    return lates


if __name__ == "__main__":
    probe_health(sys.argv[1])
