"""The demo and test peers: an in-process HTTP/2 origin (``h2server``) and a keep-alive
HTTP/1.1 client (``h1client``).  Not part of the proxy: ``muxproxy demo`` and the tests use
them; nothing under ``muxproxy.io`` or ``muxproxy.core`` imports them."""
