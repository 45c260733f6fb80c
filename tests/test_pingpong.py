"""The floor bench/overhead.py compares a fault with: a real round trip through the link."""

from emu.net import pingpong
from tests.conftest import config


def test_ping_pong_through_the_link_measures_its_floor():
    result = pingpong.measure(config(link__rtt="100us"), rounds=5)
    assert result["rounds"] == 5
    # the link holds every frame until its arrival time: a round trip is never shorter
    assert result["rtt-us"] >= result["link-us"] > 100
    assert result["floor-us"] > 0


def test_ping_pong_carries_the_payload_when_asked():
    result = pingpong.measure(config(emulator__payload="true"), rounds=3)
    assert result["floor-us"] > 0
