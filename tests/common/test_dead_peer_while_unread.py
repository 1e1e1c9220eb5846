"""A peer whose connection fails while the messages it sent wait unread must not take the process down.

libzmq 4.3.5 aborts the whole process (``Assertion failed: !_io_error``, zeromq/libzmq#4767) when such a connection
fails and a ZMTP heartbeat is due. Every tmrl socket gets into that state in normal work: the relay stops reading
the workers while the trainer is back-pressured, a worker's weights thread is busy preparing an actor while more
versions arrive. The default transport therefore sends no ZMTP heartbeats and finds dead connections with TCP
keepalive instead. Each case runs in a child process, so an abort fails the test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent('''
    import subprocess, sys, time, zmq
    from tmrl_common.sockets import TransportConfig, apply_transport
    from tmrl_relay.config import RelayConfig

    socket_type, recv_hwm = sys.argv[1], int(sys.argv[2])
    transport = RelayConfig().transport if socket_type == "ROUTER" else TransportConfig()
    context = zmq.Context()
    server = context.socket(getattr(zmq, socket_type))
    apply_transport(server, transport.model_copy(update={"recv_hwm": recv_hwm}))
    if socket_type == "SUB":
        server.setsockopt(zmq.SUBSCRIBE, b"")
    peer_type = "DEALER" if socket_type == "ROUTER" else "PUB"
    listener = context.socket(zmq.PAIR)  # the peer says when it has sent everything
    ready = listener.bind_to_random_port("tcp://127.0.0.1")
    peer = subprocess.Popen([sys.executable, "-c", PEER, peer_type, str(ready)])
    endpoint = listener.recv_string()
    server.connect(endpoint) if socket_type == "SUB" else None
    if socket_type == "ROUTER":
        server_port = server.bind_to_random_port("tcp://127.0.0.1")
        listener.send_string(f"tcp://127.0.0.1:{server_port}")
    listener.recv_string()  # the peer filled our receive queue
    peer.kill()  # dies while its messages wait unread here
    peer.wait()
    time.sleep(3.5)  # a few heartbeat intervals of the old default (1 s) pass without this process reading
    read = 0
    while server.poll(300):
        server.recv_multipart()
        read += 1
    print("alive, read", read)
''')

_PEER = textwrap.dedent('''
    import sys, time, zmq
    peer_type, ready = sys.argv[1], int(sys.argv[2])
    context = zmq.Context()
    control = context.socket(zmq.PAIR)
    control.connect(f"tcp://127.0.0.1:{ready}")
    sock = context.socket(getattr(zmq, peer_type))
    sock.setsockopt(zmq.SNDHWM, 0)
    if peer_type == "PUB":
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        control.send_string(f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)  # the SUB connects and subscribes
    else:
        control.send_string("ready")
        sock.connect(control.recv_string())
    for _ in range(2000):
        sock.send_multipart([b"envelope", b"x" * 2000])
    time.sleep(1.0)
    control.send_string("sent")
    time.sleep(60)
''')


@pytest.mark.parametrize("socket_type, recv_hwm", [("ROUTER", 100), ("SUB", 4)],
                         ids=["relay-router-recv-hwm-100", "worker-weights-sub-recv-hwm-4"])
def test_a_peer_dying_while_its_messages_wait_unread_does_not_abort_the_process(socket_type, recv_hwm):
    child = _CHILD.replace("PEER", repr(_PEER))
    result = subprocess.run([sys.executable, "-c", child, socket_type, str(recv_hwm)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.startswith("alive, read ")
    assert int(result.stdout.split()[-1]) >= 1

