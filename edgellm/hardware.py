"""What the machine offers: the one definition of a default thread count for every stage.

llama.cpp decodes fastest with one thread per physical core (its own default; hyper-threads share the core's
vector units and slow the team's barriers), limited to the cores this process may run on.
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, or all of them off Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores of the machine (from /sys on Linux; the logical count when that cannot be read)."""
    cores: set[tuple[str, str]] = set()
    base = "/sys/devices/system/cpu"
    try:
        for entry in os.listdir(base):
            if not (entry.startswith("cpu") and entry[3:].isdigit()):
                continue
            topo = os.path.join(base, entry, "topology")
            with open(os.path.join(topo, "physical_package_id")) as f:
                package = f.read().strip()
            with open(os.path.join(topo, "core_id")) as f:
                core = f.read().strip()
            cores.add((package, core))
    except OSError:
        return usable_cpus()
    return max(1, len(cores)) if cores else usable_cpus()


def default_threads() -> int:
    """Threads for llama.cpp when a setting gives none: physical cores, at most the CPUs this process may use."""
    return max(1, min(physical_cores(), usable_cpus()))


def available_memory() -> int:
    """Bytes this process can still allocate: the kernel's MemAvailable, or the room left under a cgroup (v2)
    memory limit (a container's) when that is smaller; the physical memory where neither can be read."""
    amounts: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    amounts.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                amounts.append(max(0, int(limit) - int(f.read().strip())))
    except (OSError, ValueError):
        pass
    if not amounts:
        try:
            amounts.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError, AttributeError):
            return 8 * 1024**3  # unknown: assume a small laptop
    return min(amounts)
