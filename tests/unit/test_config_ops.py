"""config: the keys added for operations (SNI certificates, PROXY protocol) and their errors."""

from __future__ import annotations

import pytest

from muxproxy.config import ConfigError, loads

TAIL = '[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:9"]\n[[routes]]\ncluster = "app"\n'


def cfg(listener: str) -> str:
    return f'[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:8080"\n{listener}\n{TAIL}'


def test_tls_list_and_table_forms() -> None:
    one = loads(cfg('tls = { cert = "c.pem", key = "k.pem" }')).listeners[0]
    assert [t.cert for t in one.certificates] == ["c.pem"] and one.tls_path(0) == "tls"
    many = loads(
        cfg(
            'tls = [{ cert = "a.pem", key = "a.key", names = ["a.example"] },'
            ' { cert = "d.pem", key = "d.key" }]'
        )
    ).listeners[0]
    assert [t.names for t in many.certificates] == [("a.example",), ()]
    assert many.tls_path(1) == "tls[1]"
    assert loads(cfg("")).listeners[0].certificates == ()


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ("tls = []", "listeners[0].tls: an empty list"),
        (
            'tls = [{ cert = "a", key = "a" }, { cert = "b", key = "b" }]',
            "listeners[0].tls[1].names: only one certificate may be the default",
        ),
        (
            'tls = [{ cert = "a", key = "a", names = ["x.example"] },'
            ' { cert = "b", key = "b", names = ["X.example"] }]',
            "listeners[0].tls[1].names[0]: 'X.example' is named by two certificates",
        ),
        (
            'tls = [{ cert = "a", key = "a", names = ["a.*.example"] }]',
            "listeners[0].tls[0].names[0]: bad server name",
        ),
        ("proxy_protocol = true", "listeners[0].proxy_protocol: needs trusted_proxies"),
        (
            'proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8"]\n'
            '[listeners.limits]\nproxy_protocol_timeout = "0s"',
            "listeners[0].limits.proxy_protocol_timeout: must be more than 0",
        ),
        (
            '[listeners.limits]\nproxy_protocol_timeout = 5',
            'listeners[0].limits.proxy_protocol_timeout: a duration needs a unit',
        ),
    ],
)
def test_listener_errors_name_the_key(listener: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(cfg(listener))
    assert str(err.value).startswith(message), str(err.value)


def test_proxy_protocol_defaults() -> None:
    lst = loads(cfg('proxy_protocol = true\ntrusted_proxies = ["127.0.0.1"]')).listeners[0]
    assert lst.proxy_protocol and lst.limits.proxy_protocol_timeout == 5.0
