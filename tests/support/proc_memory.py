"""Resident-memory readings of the current process from Linux's /proc, for the probe scripts
that measure peaks in a fresh process (tests/memory/memory_probe.py, tests/quant/rss_probe.py).
Standard library only: the probes import it before torch."""

from __future__ import annotations


def status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM`` …) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
