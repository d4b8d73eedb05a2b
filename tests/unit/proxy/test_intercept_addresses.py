"""The kernel's address texts as addresses (`intercept._ipv4`): the value parsing
the text gives, one object per text, bounded."""

from __future__ import annotations

import ipaddress

from egressd.proxy import intercept


def test_kernel_texts_read_as_parsed_and_kept_bounded() -> None:
    for text in ("100.96.1.2", "203.0.113.10", "0.0.0.0", "255.255.255.255", "10.0.0.1"):
        address = intercept._ipv4(text)
        assert address == ipaddress.IPv4Address(text) and str(address) == text
        assert intercept._ipv4(text) is address
    for i in range(intercept._ADDRESSES_LIMIT + 10):
        assert int(intercept._ipv4(str(ipaddress.IPv4Address(i)))) == i
    assert 0 < len(intercept._ADDRESSES) <= intercept._ADDRESSES_LIMIT
