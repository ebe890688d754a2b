"""Where and how computation runs: the device, the AMP dtype and autocast, the process-wide CUDA
switches (TF32, cuDNN autotuning, determinism), device sync, progress bars, the CPU shard pool
that splits an attack's batch over single-threaded workers, and the guard that keeps AVX2 CPUs
off a crashing oneDNN convolution.
"""
from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import warnings

import torch
import torch.nn as nn

from .errors import UserError


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device, which must be one this
    build of torch can train on here (UserError naming those otherwise: mps, meta, a missing GPU)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usable = usable_devices()
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; this build of torch can use {', '.join(usable)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec} asked for, but CUDA is not available here; "
                        f"this build of torch can use {', '.join(usable)}")
    if (dev.type == "cpu" or (dev.type == "mps" and "mps" in usable) or
            (dev.type == "cuda" and (dev.index is None or dev.index < torch.cuda.device_count()))):
        return dev
    raise UserError(f"device {spec} cannot be used here; this build of torch can use {', '.join(usable)}")


def usable_devices() -> list[str]:
    """The --device values this build of torch can train on, here."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def amp_dtype(mode: str, device: torch.device):
    """The autocast dtype, or None for fp32. 'auto': bf16 on CUDA; fp32 on the CPU, where the
    fast path reproduces the reference's numbers. 'bf16' on a CPU with native bf16 (AVX512-BF16:
    this machine) makes an attack step about 1.8x faster at bf16's rounding (bench/README.md);
    on CPUs without it, bf16 is emulated and much slower."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("--amp bf16 on a CPU without AVX512-BF16/AMX: bf16 is emulated here and "
                      "much slower than fp32 (--amp off)", stacklevel=2)
    return torch.float16 if mode == "fp16" else torch.bfloat16


@functools.cache   # the CPU does not change; amp_dtype runs for every trainer and evaluation
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes in bf16 natively (x86 AVX512-BF16 or AMX-BF16, ARM BF16);
    None where /proc/cpuinfo does not say (not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to here ("AVX2", "AVX512", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def _crashing_conv(m: nn.Module) -> bool:
    """A convolution whose channels_last weight gradient crashes oneDNN on AVX2 (below)."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (2, 2)
            and m.groups == 1 and m.in_channels < 8)


def _nchw_inputs(conv: nn.Module, args: tuple) -> tuple:
    w = conv.weight
    if w.stride() != torch.empty(w.shape, device="meta").stride():
        w.data = w.data.clone(memory_format=torch.contiguous_format)   # the layout only
    return (args[0].contiguous(),) + args[1:]


def guard_cpu_convs(model: nn.Module, device: torch.device | str, capability: str | None = None) -> int:
    """Keep model trainable on CPUs whose kernels dispatch to AVX2: there oneDNN 3.12 (torch 2.14.1)
    corrupts the heap computing the weight gradient of a 1x1, stride-2, ungrouped convolution with
    fewer than 8 input channels on a channels_last input or weight ("double free or corruption", or
    SIGSEGV: seen for 1-7 channels; 8 and more, grouped, stride 1 or 3, 3x3 run). ResNet18 below
    width 8 has such shortcuts. Each such convolution gets its input and weight in NCHW (a forward
    pre-hook; the other layers stay channels_last), so oneDNN takes its NCHW path, which runs (also
    with a channels_last gradient from the next layer). A [C_out, C_in, 1, 1] weight reads as
    contiguous in both layouts, so its strides are what is checked. Nothing changes on CUDA or
    on other ISAs. Returns the number of convolutions guarded. capability: the CPU's
    (cpu_capability()) unless given (tests)."""
    if torch.device(device).type != "cpu" or (capability or cpu_capability()) != "AVX2":
        return 0
    convs = [m for m in model.modules() if _crashing_conv(m)]
    for m in convs:
        m.register_forward_pre_hook(_nchw_inputs)
    return len(convs)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast for device's type at dtype, or a no-op context for dtype None (fp32).

    A fresh context per call: autocast state is per thread, so each worker of a split attack
    enters its own.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. Call before reading the
    clock: CUDA calls return when queued, so time read without it is the queueing time."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Process-wide CUDA switches (TF32, cuDNN autotuning, determinism)

def backend_flags() -> dict:
    """The process-wide switches that change GPU numbers or speed, as they are now; recorded
    beside every GPU measurement. (On the CPU none of them changes anything.)"""
    def read(get):
        try:
            return get()
        except RuntimeError as e:   # torch refuses to read a mix of its legacy and new TF32 APIs
            return f"unreadable ({e})"
    return {"tf32_matmul": read(lambda: torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": read(lambda: torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def set_backends(device: torch.device | str, *, tf32: bool | None = None, cudnn_benchmark: bool | None = None,
                 deterministic: bool = False) -> dict:
    """Set the CUDA switches for a run on `device`; returns the previous state (backend_flags()),
    for restore_backends. Nothing changes for other devices: the CPU has no TF32 or cuDNN, and
    is deterministic for a fixed thread count.

    tf32: TF32 for fp32 matmuls and convolutions (torch's default for cuDNN is on, which makes
    "fp32" on Ampere+ GPUs TF32: 10-bit mantissas); the Trainer and evaluate pass their config's
    (default off), so TF32 is only ever on when asked. cudnn_benchmark: let cuDNN
    time its algorithms per shape (faster steady state, not reproducible). deterministic:
    cudnn.deterministic, torch.use_deterministic_algorithms(True) (ops without a deterministic
    CUDA kernel then raise) and CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set; cudnn_benchmark off.
    None (tf32, cudnn_benchmark) and deterministic=False leave a switch as it is (restore_backends
    undoes them).
    """
    prev = backend_flags()
    if torch.device(device).type != "cuda":
        return prev
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    return prev


def restore_backends(state: dict) -> None:
    """Put back a state that backend_flags() / set_backends() returned."""
    for key, attr in (("tf32_matmul", torch.backends.cuda.matmul), ("tf32_cudnn", torch.backends.cudnn)):
        if isinstance(state[key], bool):
            attr.allow_tf32 = state[key]
    torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = state["cudnn_deterministic"]
    torch.use_deterministic_algorithms(state["deterministic_algorithms"])
    if state["cublas_workspace_config"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state["cublas_workspace_config"]


def progress_bar(total: int, desc: str, enabled: bool = True, *, position: int = 0,
                 unit: str = "it", initial: int = 0, leave: bool = False, bar_format: str | None = None):
    """A tqdm bar, or None when not enabled (callers test for None: no bar, no cost)."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, position=position,
                leave=leave, dynamic_ncols=True, bar_format=bar_format)


# ---------------------------------------------------------------------------------------------
MIN_SHARD = 8   # samples per CPU worker below which splitting the batch costs more than it saves
# Samples x height x width of the largest slice a CPU worker attacks at a time (64 CIFAR images).
# A large batch's activations overflow the caches and the memory-bound ops (ReLU, residual adds
# and their backward) slow down; measured here, one attack step of ResNet18 width 16 on 512
# CIFAR-sized samples took 495 ms in one piece, 377 ms as 128-sample slices, 369 ms as 64
# (width 64: 256 samples 2.72 s at once, 2.47 s as 64s).
CHUNK_PIXELS = 64 * 32 * 32


# ---------------------------------------------------------------------------------------------
# CPU batch sharding
#
# torch's intra-op parallelism splits every op across the cores and meets at a barrier after
# each one: hundreds of barriers per PGD step, and on a small shared CPU one descheduled thread
# stalls the other at every one of them (measured here, ResNet18 width 16, batch 128, PGD-10,
# with other jobs on the two cores: a FAT training step took 5.1 s with the attack on 2 OpenMP
# threads, 2.3 s with it as two 64-sample halves on two single-threaded workers; on an idle
# machine the split is still 4% (128 samples) to 9% (512) faster for a 10-step attack).
# An attack in eval mode treats samples independently, so each core can take a contiguous slice
# of the batch with no barrier until the join.

class _ShardPool:
    """Daemon worker threads, each with a single torch intra-op thread, running one job each."""

    def __init__(self, n: int):
        self.n = n
        self.pid = os.getpid()
        self.lock = threading.Lock()          # one sharded call at a time
        self.jobs = [queue.Queue() for _ in range(n)]
        self.cancelled = threading.Event()    # set while an interrupted map waits for its jobs
        self.idents: set[int] = set()
        keep = torch.get_num_threads()
        ready = threading.Barrier(n + 1)
        for i in range(n):
            threading.Thread(target=self._work, args=(i, ready), daemon=True,
                             name=f"fastfat-shard-{i}").start()
        ready.wait()
        # torch.set_num_threads in a worker also sets the process-wide default that new threads
        # start from; the workers have taken theirs, so put the caller's back.
        torch.set_num_threads(keep)

    def _work(self, i: int, ready: threading.Barrier) -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()    # initialise this thread's OpenMP count now, at 1
        self.idents.add(threading.get_ident())
        ready.wait()
        while True:
            fn, arg, done = self.jobs[i].get()
            try:
                done.put((i, fn(arg), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
                done.put((i, None, e))
            finally:
                self.jobs[i].task_done()

    def map(self, fn, args: list) -> list:
        """[fn(a) for a in args], job i on worker i; the first exception is re-raised here.

        If the caller is interrupted (Ctrl-C: KeyboardInterrupt reaches the main thread only),
        the workers' jobs are let finish before the exception goes on, with `cancelled` set so
        that sharded() skips their remaining slices: no worker is then inside torch when the
        interpreter exits. Python 3.11 ends a daemon thread that wakes during finalization with
        pthread_exit, which inside torch's C++ aborts the process ("terminate called without an
        active exception", SIGABRT); and a caller that goes on (a notebook) would otherwise find
        the abandoned jobs still running."""
        with self.lock:
            done = queue.Queue()
            try:
                for i, a in enumerate(args):
                    self.jobs[i].put((fn, a, done))
                results = [done.get() for _ in args]
            except BaseException:
                self.cancelled.set()
                self._wait_idle()
                self.cancelled.clear()
                raise
        out, err = [None] * len(args), None
        for i, value, e in results:
            out[i] = value
            err = err or e
        if err is not None:
            raise err
        return out

    def _wait_idle(self) -> None:
        """Until every job handed out has finished (at most one slice each once cancelled); a
        further Ctrl-C meanwhile does not cut the wait short."""
        for q in self.jobs:
            while True:
                try:
                    q.join()
                    break
                except KeyboardInterrupt:
                    continue


_POOLS: dict[int, _ShardPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> _ShardPool:
    with _POOLS_LOCK:
        pool = _POOLS.get(n)
        if pool is None or pool.pid != os.getpid():   # a forked child has no workers
            pool = _POOLS[n] = _ShardPool(n)
        return pool


def shard_count(x: torch.Tensor, threads: int | None = None) -> int:
    """How many slices a batch x is split into: torch's thread count on the CPU (threads=None),
    1 on GPUs, inside a worker, or when the slices would be smaller than MIN_SHARD samples."""
    if threads is None:
        threads = torch.get_num_threads() if x.device.type == "cpu" else 1
    for pool in list(_POOLS.values()):
        if threading.get_ident() in pool.idents:
            return 1                                   # already on a worker: no nesting
    return max(1, min(int(threads), x.shape[0] // MIN_SHARD))


def shard_slices(n: int, shards: int) -> list[slice]:
    """`shards` contiguous slices covering range(n), sizes differing by at most one."""
    bounds = [n * i // shards for i in range(shards + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def chunk_size(x: torch.Tensor) -> int | None:
    """The most samples of x a CPU worker handles at a time (CHUNK_PIXELS / (H * W), at least
    MIN_SHARD); None (no limit) off the CPU, where large batches are what keeps a GPU busy."""
    if x.device.type != "cpu":
        return None
    hw = x.shape[-2] * x.shape[-1] if x.dim() == 4 else 1
    return max(MIN_SHARD, CHUNK_PIXELS // max(hw, 1))


def sharded(fn, n: int, shards: int, chunk: int | None = None) -> list:
    """fn(slice) for contiguous slices covering range(n), in order: at least `shards` slices and
    none longer than `chunk` samples (when given). With shards > 1 each CPU worker thread (one
    intra-op thread each) takes a contiguous run of slices, one after another; with 1 they run
    inline. fn must treat samples independently and set any thread-local state it needs (grad
    mode, autocast) itself."""
    count = max(shards, -(-n // chunk)) if chunk else shards
    slices = shard_slices(n, max(1, min(count, n)))
    if shards <= 1:
        return [fn(s) for s in slices]
    runs = shard_slices(len(slices), shards)
    pool = _pool(shards)

    def work(run: slice) -> list:
        out = []
        for s in slices[run]:
            if pool.cancelled.is_set():   # the caller was interrupted; these results are dropped
                break
            out.append(fn(s))
        return out

    per_worker = pool.map(work, runs)
    return [r for rs in per_worker for r in rs]


