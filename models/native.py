"""Native CPU kernels for training's hottest loops (``models/native.c``), compiled on first use.

Three parts of CPU training run here in one pass each instead of many element-wise torch passes:
the quantile head's weighted pinball loss with its gradient (:class:`models.module._HeadPinball`,
half of a training step's forward + backward in torch on the 2-core VM), each LSTM step's gate
activations and cell update with their backward (:func:`models.module._cell_step`,
:class:`models.module._LSTMRecurrence`; the matrix products stay in torch), and the
recalibration's grid search (:func:`models.calibration._fit_regime`). Where the library cannot be
had (no C compiler, a failed build, ``WARMCAST_NATIVE=0``, another device or dtype) the torch code
computes the same values: results differ by float rounding only, which, like a different seed,
can move early stopping's choices (README, "Backtest").

The library is built with the machine's C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``)
for this CPU (``-march=native``: glibc's vector exp / log1p / tanh) into a per-user cache,
``$WARMCAST_NATIVE_CACHE`` or ``~/.cache/warmcast/native``, named by a hash of the source, the
flags, the compiler and the CPU, and renamed into place when complete (a half-written library is
never loaded; a cached one is loaded only if this user owns it and nobody else may write it).
``-ffast-math`` is used to compile but not to link: linked with it, GCC 12 adds start-up code that
flushes denormals for the whole process, which would change torch's numerics too. It also lets
the compiler assume finite values: the kernels' inputs are the model's own activations and
demand, which models.features refuses when NaN or infinite.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
#: ``0`` turns the native kernel off (the torch path everywhere)
ENV_SWITCH = "WARMCAST_NATIVE"
ENV_CACHE = "WARMCAST_NATIVE_CACHE"
COMPILE_FLAGS = ("-O3", "-ffast-math", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-lm")  # no -ffast-math here: see the module docstring
#: users per thread below which a call is not split over threads
MIN_USERS_PER_THREAD = 16
#: grid values x columns of one grid_pinball call: the kernel's per-user sums live on its stack
#: (8 bytes each; the recalibration's largest is 26 spreads x 144)
MAX_GRID_VALUES = 1 << 15


def _sizes() -> dict[str, int]:
    from models.module import MID, N_HORIZONS, N_QUANTILES, N_RESOURCES  # the one definition of the sizes

    return {"WC_LEVELS": N_QUANTILES, "WC_CELLS": N_HORIZONS * N_RESOURCES, "WC_MID": MID,
            "WC_HORIZONS": N_HORIZONS, "WC_RESOURCES": N_RESOURCES}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE)
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "warmcast" / "native"
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".probe-")
        probe.close()
        return base
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"warmcast-native-{os.getuid()}"
        fallback.mkdir(exist_ok=True, mode=0o700)
        return fallback


def _trusted(path: Path) -> bool:
    """A cached library (and its folder) is used only if this user owns it and nobody else may write it."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(cc: str, target: Path, defines: list[str]) -> None:
    """Compile and link into a temporary file next to ``target``, then rename it into place."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "native.o", Path(tmp) / "native.so"
        last_error: subprocess.CalledProcessError | None = None
        for arch in (["-march=native"], []):  # a compiler that does not know -march=native: portable code
            try:
                subprocess.run([cc, "-c", *COMPILE_FLAGS, *arch, *defines, str(SOURCE), "-o", str(obj)],
                               check=True, capture_output=True, text=True, timeout=120)
                break
            except subprocess.CalledProcessError as exc:
                last_error = exc
        else:
            raise RuntimeError(f"{cc} failed to compile {SOURCE.name}: {last_error.stderr.strip()[-500:] if last_error else ''}")
        done = subprocess.run([cc, str(obj), "-o", str(lib), *LINK_FLAGS], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{cc} failed to link {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(lib, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one log line saying why) where it cannot be had."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found ($CC, cc, gcc, clang): CPU training's element-wise kernels run in torch (slower)")
        return None
    try:
        defines = [f"-D{k}={v}" for k, v in _sizes().items()]
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *COMPILE_FLAGS, *LINK_FLAGS, *defines, cc, version, _cpu_signature()]).encode()).hexdigest()[:24]
        cache = _cache_dir()
        if not _trusted(cache):  # another user could swap the library between our check and the load
            raise OSError(f"the cache folder {cache} is not this user's alone (set ${ENV_CACHE} to one that is)")
        target = cache / f"warmcast-native-{key}.so"
        built = not (target.exists() and _trusted(target))
        if built:
            _build(cc, target, defines)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("native kernel unavailable, CPU training's element-wise kernels run in torch (slower): %s", exc)
        return None
    log.info("native kernel %s %s", "built into" if built else "loaded from", target)
    lib.head_pinball.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.head_pinball.restype = None
    lib.grid_pinball.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    lib.grid_pinball.restype = None
    lib.lstm_forward_step.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
    lib.lstm_forward_step.restype = None
    lib.lstm_backward_step.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    lib.lstm_backward_step.restype = None
    return lib


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers of this process: a child forked after the parent made its pool
    inherits the pool but not its threads (work handed to it would wait forever), so pools are per
    process id."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="warmcast-native")
    return _POOLS[key]


def _run_parts(bounds: list[tuple[int, int]], call: Callable[[int, int], None]) -> None:
    """``call(lo, hi)`` for every part in ``bounds``, the first in this thread and the others in the
    pool's threads at the same time (ctypes releases the GIL during each call)."""
    futures = [_pool(len(bounds) - 1).submit(call, *part) for part in bounds[1:]] if len(bounds) > 1 else []
    call(*bounds[0])
    for f in futures:
        f.result()


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernel is not available (see models.native.library)")
    return lib


def usable(t: Tensor) -> bool:
    """Whether the native kernel takes the head of a computation on ``t``'s device and dtype (not
    while ``$WARMCAST_NATIVE`` is ``0``, read at each call)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return t.device.type == "cpu" and t.dtype == torch.float32 and library() is not None


def _check(name: str, t: Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """``t`` must be a contiguous CPU tensor of ``dtype`` (and ``shape`` when given): the kernels
    read raw memory."""
    if (shape is not None and tuple(t.shape) != shape) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {str(dtype).removeprefix('torch.')} CPU tensor" + (f" of shape {shape}" if shape is not None else "")
                         + f", got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")


def lstm_forward_step(gates: Tensor, c: Tensor, c_out: Tensor, tanh_out: Tensor, h_out: Tensor) -> None:
    """One LSTM step after the gate pre-activations ``gates`` ``[U, C, 4H]`` (activated in place):
    writes ``c_out``, ``tanh_out`` (tanh of ``c_out``) and ``h_out`` ``[U, C, H]`` from the cell
    state ``c``; gate order (input, forget, output, cell). Contiguous float32 CPU tensors; one
    thread (256 users' step split over two ran no faster, hidden 32 or 64). See native.c."""
    lib = _lib()
    for name, tensor in dict(gates=gates, c=c, c_out=c_out, tanh_out=tanh_out, h_out=h_out).items():
        _check(name, tensor)
    hidden = c.shape[-1]
    if gates.numel() != 4 * c.numel() or not c.numel() == c_out.numel() == tanh_out.numel() == h_out.numel():
        raise ValueError(f"gates {tuple(gates.shape)} must have 4x the elements of c, c_out, tanh_out, h_out {tuple(c.shape)}")
    lib.lstm_forward_step(gates.data_ptr(), c.data_ptr(), c_out.data_ptr(), tanh_out.data_ptr(), h_out.data_ptr(),
                          c.numel() // hidden, hidden)


def lstm_backward_step(acts: Tensor, c_prev: Tensor, tc: Tensor, grad_h: Tensor, t: int, dh: Tensor, dc: Tensor,
                       dgates: Tensor) -> None:
    """The backward pass of :func:`lstm_forward_step` at step ``t``: ``acts`` ``[U, C, 4H]`` its
    activations, ``c_prev`` ``[U, C, H]`` the cell state before it, ``tc`` tanh of the one after;
    ``grad_h`` ``[U, S, C, H]`` the loss gradient w.r.t. every step's h (step ``t`` is added into
    ``dh``). Updates ``dh`` (+ this step's output gradient) and ``dc`` (to the gradient of ``c_prev``)
    and writes ``dgates`` ``[U, C, 4H]``; ``dh`` is then the caller's to replace by dgates·W_recᵀ."""
    lib = _lib()
    for name, tensor in dict(acts=acts, c_prev=c_prev, tc=tc, grad_h=grad_h, dh=dh, dc=dc, dgates=dgates).items():
        _check(name, tensor)
    n_users, steps, chunks, hidden = grad_h.shape
    if not 0 <= t < steps or tuple(dh.shape) != (n_users, chunks, hidden) or not (
            dh.shape == dc.shape == c_prev.shape == tc.shape) or acts.shape != dgates.shape or acts.numel() != 4 * dh.numel():
        raise ValueError(f"inconsistent shapes: grad_h {tuple(grad_h.shape)}, t {t}, dh {tuple(dh.shape)}, dc {tuple(dc.shape)}, "
                         f"acts {tuple(acts.shape)}, dgates {tuple(dgates.shape)}")
    step_h = grad_h.data_ptr() + t * chunks * hidden * grad_h.element_size()
    lib.lstm_backward_step(acts.data_ptr(), c_prev.data_ptr(), tc.data_ptr(), step_h, steps * chunks * hidden, max(chunks, 1),
                           dh.data_ptr(), dc.data_ptr(), dgates.data_ptr(), n_users * chunks, hidden)


def head_pinball(raw: Tensor, y: Tensor, weight: Tensor, tau: Tensor, with_grad: bool) -> Tensor:
    """The weighted pinball sums ``[U, R]`` (float64) of head outputs ``raw`` ``[U, N, K·C]``
    (level-major), ``y`` ``[U, N, C]`` (demand − last value), ``weight`` ``[U, N, HORIZONS]``;
    with ``with_grad``, ``raw`` is overwritten by the sums' gradient w.r.t. it. See native.c.

    Users are split over torch's thread count (ctypes releases the GIL during each call)."""
    lib = _lib()
    sizes = _sizes()
    n_users, n = raw.shape[:2]
    cells, levels, horizons = sizes["WC_CELLS"], sizes["WC_LEVELS"], sizes["WC_HORIZONS"]
    expected = {"raw": (raw, (n_users, n, levels * cells)), "y": (y, (n_users, n, cells)),
                "weight": (weight, (n_users, n, horizons)), "tau": (tau, (levels,))}
    for name, (t, shape) in expected.items():
        _check(name, t, shape)
    sums = torch.empty(n_users, sizes["WC_RESOURCES"], dtype=torch.float64)
    if not n_users:
        return sums
    args = (raw.data_ptr(), y.data_ptr(), weight.data_ptr(), tau.data_ptr(), sums.data_ptr())
    threads = max(1, min(torch.get_num_threads(), n_users // MIN_USERS_PER_THREAD))
    step = -(-n_users // threads)
    _run_parts([(lo, min(lo + step, n_users)) for lo in range(0, n_users, step)],
               lambda u0, u1: lib.head_pinball(*args, u0, u1, n, int(with_grad)))
    return sums


def grid_pinball(base: Tensor, delta: Tensor | None, y: Tensor, tau: Tensor, grid: Tensor, user: Tensor, n_users: int,
                 out: Tensor | None = None) -> Tensor:
    """The recalibration grid's loss sums ``[G, n_users, M]`` (float64, added into ``out`` when
    given, else into zeros): per grid value ``g`` and
    user, Σ over that user's points of ``pinball_tau(y, pred)`` with ``pred = max(base + g·delta, 0)``,
    or, where ``delta`` is None, the floor ``pred = 0 if base < g else max(base, 0)``. ``base``,
    ``delta``, ``y`` ``[P, M]``, ``tau`` ``[M]`` (each column's level), ``user`` ``[P]`` the row of
    the result each point adds to (non-decreasing, in ``[0, n_users)``). See native.c.

    Users are split over torch's thread count at user boundaries (each writes its own rows)."""
    lib = _lib()
    n_points, m = y.shape
    for name, t in {"base": base, "delta": delta, "y": y}.items():
        if t is not None:
            _check(name, t, (n_points, m))
    _check("tau", tau, (m,))
    _check("grid", grid, (len(grid),))
    _check("user", user, (n_points,), torch.int64)
    if m * len(grid) > MAX_GRID_VALUES:  # the kernel keeps one user's sums on its stack
        raise ValueError(f"{len(grid)} grid values x {m} columns exceed {MAX_GRID_VALUES} sums per user")
    if n_points and (int(user[0]) < 0 or int(user[-1]) >= n_users or bool((user[1:] < user[:-1]).any())):
        raise ValueError(f"user must be non-decreasing and lie in [0, {n_users})")
    sums = torch.zeros(len(grid), n_users, m, dtype=torch.float64) if out is None else out
    _check("out", sums, (len(grid), n_users, m), torch.float64)
    if not n_points:
        return sums
    # the kernel writes row user - user[0] from a pointer to row user[0]; a grid value's rows are n_users apart
    rows = sums[:, int(user[0]):]
    mode = 1 if delta is None else 0
    args = (base.data_ptr(), (base if delta is None else delta).data_ptr(), y.data_ptr(), tau.data_ptr(), grid.data_ptr(),
            len(grid), user.data_ptr())
    threads = max(1, min(torch.get_num_threads(), n_points // 4096))
    edges = [0, n_points]
    if threads > 1:  # each thread's points start at a user's first point: no two threads add to one row
        edges += torch.searchsorted(user, user[torch.arange(1, threads) * n_points // threads]).tolist()
    edges = sorted(set(edges))
    _run_parts(list(zip(edges[:-1], edges[1:])), lambda p0, p1: lib.grid_pinball(*args, p0, p1, m, mode, rows.data_ptr(), n_users))
    return sums
