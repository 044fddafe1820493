"""What a pause costs gRPC itself: round trips back to back vs after an idle pause.

    python bench/grpc_pause.py [--pauses-ms 0 1 5 20 50] [--calls 200] [--request-bytes 110000]

A plain grpc.aio echo server in a child process (no visionserve code: one generic
method that answers 100 bytes at once) and a synchronous client in this one. Each call is
sent ``pause`` ms after the last answer; the figure is the p50 round trip, next to the same
for a raw TCP echo (two sockets, no gRPC). A served request waits its inference's length
(20 ms for ResNet-18 on a CPU) between being read and being answered: this shows how much
of what batch-1 adds over in-process inference is gRPC's own cost after such a pause,
before any visionserve code runs (``bench/overload.py`` measures the same with its no-work
request). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

METHOD = "/bench.Echo/Call"


def serve_grpc(port: int) -> None:
    import grpc

    def ident(data: bytes) -> bytes:
        return data

    async def call(request: bytes, context) -> bytes:
        return request[:100]

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        handler = grpc.unary_unary_rpc_method_handler(call, ident, ident)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler})]
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_tcp(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        size = int.from_bytes(_read(conn, 4), "big")
        _read(conn, size)
        conn.sendall(b"x" * 100)


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise SystemExit(0)
        data += chunk
    return data


def p50_ms(send, pause_s: float, calls: int) -> float:
    times = []
    for _ in range(calls):
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        send()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[calls // 10 :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pauses-ms", type=float, nargs="+", default=[0, 1, 5, 20, 50])
    parser.add_argument("--calls", type=int, default=200, help="calls per pause (default 200)")
    parser.add_argument("--request-bytes", type=int, default=110_000,
                        help="request size (default 110000: a 224x224 PNG)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # a port: gRPC echo
    parser.add_argument("--serve-tcp", type=int, help=argparse.SUPPRESS)  # a listening fd
    args = parser.parse_args()
    if args.serve:
        serve_grpc(args.serve)
        return 0
    if args.serve_tcp is not None:
        serve_tcp(socket.socket(fileno=args.serve_tcp))
        return 0
    import grpc

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                              stdout=subprocess.PIPE, text=True)
    listener = socket.create_server(("127.0.0.1", 0))
    tcp_server = subprocess.Popen([sys.executable, __file__, "--serve-tcp", str(listener.fileno())],
                                  pass_fds=[listener.fileno()])
    try:
        server.stdout.readline()
        body = b"x" * args.request_bytes
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_unary(METHOD)
            tcp = socket.create_connection(listener.getsockname())
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            frame = len(body).to_bytes(4, "big") + body

            def tcp_call() -> None:
                tcp.sendall(frame)
                _read(tcp, 100)

            p50_ms(lambda: call(body), 0, 50)
            print(f"{args.request_bytes}-byte request, 100-byte answer; p50 of {args.calls} calls")
            for pause in args.pauses_ms:
                grpc_ms = p50_ms(lambda: call(body), pause / 1e3, args.calls)
                tcp_ms = p50_ms(tcp_call, pause / 1e3, args.calls)
                print(f"  pause {pause:5.1f} ms: gRPC {grpc_ms:.2f} ms, raw TCP {tcp_ms:.2f} ms")
            tcp.close()
    finally:
        server.terminate()
        tcp_server.terminate()
        server.wait(10)
        tcp_server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
