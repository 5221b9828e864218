"""Several certificates per listener, chosen by SNI; checked with `openssl s_client` and curl."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import trustme

from muxproxy.config import Address, loads
from muxproxy.demo.h2server import H2Origin
from muxproxy.io.server import Proxy

from .origin import Script

pytestmark = pytest.mark.anyio


def issue(ca: trustme.CA, tmp: Path, stem: str, *names: str) -> tuple[Path, Path]:
    """A certificate whose CN is ``stem`` (what s_client shows), for ``names``."""
    cert = ca.issue_cert(*names, common_name=stem)
    pem, key = tmp / f"{stem}.pem", tmp / f"{stem}.key"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    cert.private_key_pem.write_to_path(str(key))
    return pem, key


@asynccontextmanager
async def tls_proxy(tls: str) -> AsyncIterator[tuple[Proxy, Address]]:
    origin = H2Origin(Script())
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        cfg = loads(
            f'[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\ntls = {tls}\n'
            f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
            '[[routes]]\ncluster = "app"\n'
        )
        proxy = Proxy(cfg)
        bound = await tg.start(proxy.serve)
        try:
            yield proxy, bound["edge"]
        finally:
            tg.cancel_scope.cancel()


async def served_cn(addr: Address, servername: str | None, *extra: str) -> str | None:
    """The CN of the certificate the listener presents (None: the handshake failed)."""
    argv = ["openssl", "s_client", "-connect", f"{addr.host}:{addr.port}", *extra]
    argv += ["-servername", servername] if servername else ["-noservername"]
    r = await anyio.run_process(argv, input=b"", check=False, stderr=subprocess.STDOUT)
    m = re.search(rb"^subject=.*?CN ?= ?([^,\n/]+)", r.stdout, re.M)
    return m.group(1).decode().strip() if m and r.returncode == 0 else None


async def test_certificate_chosen_by_sni(tmp_path: Path) -> None:
    ca = trustme.CA()
    dflt = issue(ca, tmp_path, "default", "default.example")
    a = issue(ca, tmp_path, "a", "a.example")
    wild = issue(ca, tmp_path, "wild", "*.b.example")
    tls = (
        f'[{{ cert = "{a[0]}", key = "{a[1]}", names = ["a.example"] }},'
        f' {{ cert = "{dflt[0]}", key = "{dflt[1]}" }},'
        f' {{ cert = "{wild[0]}", key = "{wild[1]}", names = ["*.b.example"] }}]'
    )
    async with tls_proxy(tls) as (_, addr):
        assert await served_cn(addr, "a.example") == "a"
        assert await served_cn(addr, "A.Example") == "a"  # names are case-insensitive
        assert await served_cn(addr, "x.b.example") == "wild"
        assert await served_cn(addr, "x.y.b.example") == "default"  # a wildcard is one label
        assert await served_cn(addr, "b.example") == "default"
        assert await served_cn(addr, "other.example") == "default"
        assert await served_cn(addr, None) == "default"  # no SNI at all
        # end to end: curl verifies the chosen certificate against the name it asked for
        ca_path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        for name in ("a.example", "x.b.example"):
            r = await anyio.run_process(
                ["curl", "-sS", "--cacert", str(ca_path), "--resolve",
                 f"{name}:{addr.port}:127.0.0.1", f"https://{name}:{addr.port}/hello"],
                check=False,
            )
            assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr


async def test_first_entry_is_the_default_when_all_have_names(tmp_path: Path) -> None:
    ca = trustme.CA()
    a = issue(ca, tmp_path, "a", "a.example")
    c = issue(ca, tmp_path, "c", "c.example")
    tls = (
        f'[{{ cert = "{a[0]}", key = "{a[1]}", names = ["a.example"] }},'
        f' {{ cert = "{c[0]}", key = "{c[1]}", names = ["c.example"] }}]'
    )
    async with tls_proxy(tls) as (_, addr):
        assert await served_cn(addr, "c.example") == "c"
        assert await served_cn(addr, "zzz.example") == "a"


async def test_single_table_form_and_tls_1_2_minimum(tmp_path: Path) -> None:
    ca = trustme.CA()
    one = issue(ca, tmp_path, "one", "one.example")
    async with tls_proxy(f'{{ cert = "{one[0]}", key = "{one[1]}" }}') as (_, addr):
        assert await served_cn(addr, "anything.example") == "one"
        assert await served_cn(addr, "one.example", "-tls1_2") == "one"
        old = ("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        assert await served_cn(addr, "one.example", *old) is None


async def test_reload_rereads_the_certificate_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    a = issue(ca, tmp_path, "a", "a.example")
    dflt = issue(ca, tmp_path, "default", "default.example")
    tls = (
        f'[{{ cert = "{dflt[0]}", key = "{dflt[1]}" }},'
        f' {{ cert = "{a[0]}", key = "{a[1]}", names = ["a.example"] }}]'
    )
    async with tls_proxy(tls) as (proxy, addr):
        assert await served_cn(addr, "a.example") == "a"
        renewed = issue(ca, tmp_path / ".." / tmp_path.name, "a-renewed", "a.example")
        a[0].write_bytes(renewed[0].read_bytes())
        a[1].write_bytes(renewed[1].read_bytes())
        assert await served_cn(addr, "a.example") == "a"  # not re-read on its own
        proxy.reload_certificates()
        assert await served_cn(addr, "a.example") == "a-renewed"
        assert await served_cn(addr, None) == "default"
        # a broken file: the reload is refused with the key path, the old certificates stay
        a[1].write_text("not a key")
        with pytest.raises(Exception, match=r"listeners\[0\]\.tls\[1\]: certificate"):
            proxy.reload_certificates()
        assert await served_cn(addr, "a.example") == "a-renewed"
