"""Whether this torch can use the host's GPU. An image's torch is built for one CUDA version
(PyPI's torch 2.13: CUDA 13.0; the CUDA 12 image's: 12.8), and a host's NVIDIA driver runs builds
of the CUDA major version it supports (and older). When the two do not meet, ``torch.cuda.is_available()`` is
False and a worker would quietly answer on the CPU, a hundred times slower: with ``DEVICE=auto``
it refuses to start instead, naming both versions and the way out."""

from __future__ import annotations

import ctypes

import torch

LIBCUDA = ("libcuda.so.1", "libcuda.so")  # the driver's library, mounted into a container given a GPU


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the host's NVIDIA driver supports (``cuDriverGetVersion``), or None
    where there is no driver (no GPU given to this container, or none at all)."""
    for name in LIBCUDA:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if library.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
            return version.value // 1000, version.value % 1000 // 10
    return None


def unusable_gpu(built: str, driver: tuple[int, int] | None, reason: str = "") -> str | None:
    """Why the worker must not start on the CPU, when this torch (built for CUDA ``built``) cannot
    use CUDA: a driver is there. None where there is no driver (no GPU)."""
    if driver is None:
        return None
    have = f"{driver[0]}.{driver[1]}"
    if driver[0] < int(built.split(".")[0]):  # within a major version, CUDA's minor version compatibility runs newer builds
        return (
            f"this torch ({torch.__version__}) is built for CUDA {built}, and the host's NVIDIA driver supports CUDA {have} at most, "
            f"so the GPU cannot be used. Use the image built for CUDA 12 (tag -cu128: docs/deploy.md), or run on hosts with CUDA "
            f"{built} or newer (RunPod: the endpoint's allowed CUDA versions); DEVICE=cpu runs on the CPU on purpose"
        )
    return (
        f"the host's NVIDIA driver (CUDA {have}) is there, but this torch (built for CUDA {built}) cannot use a GPU"
        f"{': ' + reason if reason else ''}. Check that the container was given the GPU (docker run --gpus all) and that "
        "CUDA_VISIBLE_DEVICES names one; DEVICE=cpu runs on the CPU on purpose"
    )


def check_gpu_usable() -> None:
    """``DEVICE=auto`` on a host with a GPU this torch cannot use: a start that fails, never a CPU worker."""
    built = torch.version.cuda
    if built is None or torch.cuda.is_available():  # a CPU build of torch, or CUDA works
        return
    driver = driver_cuda_version()
    reason = ""
    if driver is not None:
        try:
            torch.cuda.init()
        except Exception as err:  # torch's own words for it
            reason = " ".join(str(err).split())[:300]
    problem = unusable_gpu(built, driver, reason)
    if problem:
        raise RuntimeError(problem)
