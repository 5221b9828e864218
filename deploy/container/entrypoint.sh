#!/bin/sh
# muxproxy container entrypoint: one muxproxy (a supervisor and its workers) as PID 1.
#
# workers = the CPUs the container may use: the cgroup v2 CPU limit (cpu.max "quota period",
# rounded up), else the CPUs it may run on (nproc). MUXPROXY_WORKERS overrides both.
# The config (MUXPROXY_CONFIG, read-only, e.g. a ConfigMap) is copied to /tmp with its
# `workers = ...` line replaced, so the TOML must have one (in [proxy]).
# The soft open-files limit is raised to the hard one (the hard limit is the container
# runtime's: containerd/CRI-O defaults, or `--ulimit nofile=N:N` with podman/docker).
set -eu

conf=${MUXPROXY_CONFIG:-/etc/muxproxy/muxproxy.toml}
cpu_max=${MUXPROXY_CPU_MAX_FILE:-/sys/fs/cgroup/cpu.max}
workers=${MUXPROXY_WORKERS:-}

if [ -z "$workers" ]; then
    quota=max
    period=100000
    if [ -r "$cpu_max" ]; then
        read -r quota period < "$cpu_max" || true
    fi
    if [ "$quota" = max ]; then
        workers=$(nproc)
    else
        workers=$(( (quota + period - 1) / period ))
    fi
fi
[ "$workers" -ge 1 ] 2>/dev/null || workers=1

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

out=${MUXPROXY_RUNTIME_CONFIG:-/tmp/muxproxy.toml}
sed "s/^workers[[:space:]]*=.*/workers = $workers/" "$conf" > "$out"
if [ "${1:-}" = "--print-config" ]; then
    exec cat "$out"
fi
exec python -m muxproxy run -c "$out" "$@"
