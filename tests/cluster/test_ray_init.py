"""cluster.ray_init: an address where no Ray listens fails at once, with the fix in the message."""

from __future__ import annotations

import socket

import pytest

from pipeline.cluster.ray_init import check_ray_address


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nothing_listens_on_is_refused_with_the_fix():
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ConnectionError, match=rf"^no Ray cluster answers at {address} .*ray start --head"):
        check_ray_address(address)


def test_a_listening_address_and_the_ones_ray_resolves_pass():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}")
    for address in ("auto", "local", f"ray://127.0.0.1:{_closed_port()}"):
        check_ray_address(address)  # Ray's own forms: not probed here
