#!/usr/bin/env python3
"""A UDP proxy that answers late: forward each datagram to TARGET and send the reply back
DELAY seconds after it came (this kernel has no netem). For bench/storm.sh's "authority 500 ms
away".   delay-proxy.py LISTEN_IP LISTEN_PORT TARGET_IP TARGET_PORT DELAY_SECONDS"""
import asyncio
import socket
import sys


class Upstream(asyncio.DatagramProtocol):
    def __init__(self, front, client, delay):
        self.front, self.client, self.delay = front, client, delay
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, self.front.sendto, data, self.client)
        loop.call_later(self.delay, self.transport.close)


class Front(asyncio.DatagramProtocol):
    def __init__(self, target, delay):
        self.target, self.delay = target, delay
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        asyncio.ensure_future(self.forward(data, addr))

    async def forward(self, data, client):
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: Upstream(self.transport, client, self.delay),
            remote_addr=self.target, family=socket.AF_INET)
        transport.sendto(data)
        # Give up on an unanswered query after 5 s.
        loop.call_later(5 + self.delay, transport.close)


async def main():
    ip, port, tip, tport, delay = sys.argv[1:6]
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(
        lambda: Front((tip, int(tport)), float(delay)), local_addr=(ip, int(port)))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
