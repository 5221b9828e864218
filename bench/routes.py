"""Cost of route matching per request, for route tables of 10 to 1,000 entries.

    python3 bench/routes.py

Each table has N routes of the common kind (exact host, path prefix), plus one in ten with a
header or regex condition; the request matches the LAST route, so every matcher is tried
(the worst case: first match wins, and a request that matches early costs less).  Routes
for exact hosts are indexed by host, so the request (for a host with no route of its own)
tries only the wildcard routes: one in ten here, plus the last.
Prints µs per match, the median of 5 timed batches.
"""

from __future__ import annotations

import statistics
import time

from muxproxy.config import RouteConfig
from muxproxy.router import Router


def table(n: int) -> list[RouteConfig]:
    routes = []
    for i in range(n - 1):
        host = f"h{i}.example.com"
        if i % 10 == 5:
            route = RouteConfig(cluster="a", host=host, path_regex=f"/r{i}/[0-9]+")
        elif i % 10 == 7:
            route = RouteConfig(cluster="a", path_prefix=f"/p{i}/", headers={"x-v": "~v[0-9]"})
        else:
            route = RouteConfig(cluster="a", host=host, path_prefix=f"/p{i}/")
        routes.append(route)
    routes.append(RouteConfig(cluster="last", host="*"))
    return routes


def main() -> None:
    headers = [(b"user-agent", b"bench"), (b"accept", b"*/*"), (b"x-v", b"w")]
    print("| routes | µs per match (request matches the last route) |")
    print("|---|---|")
    for n in (10, 100, 1000):
        router = Router(table(n))
        reps = max(200, 200_000 // n)
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                router.match_route(b"www.example.org", b"/index.html", b"GET", headers)
            samples.append((time.perf_counter() - t) / reps * 1e6)
        last = router.match_route(b"www.example.org", b"/index.html", b"GET", headers)
        assert last is not None and last.name == f"routes[{n - 1}]"
        print(f"| {n:,} | {statistics.median(samples):.1f} |")


if __name__ == "__main__":
    main()
