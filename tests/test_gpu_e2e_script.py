"""scripts/gpu-e2e.sh, the real-hardware check, run here against the simulated vLLM and NVML with a fake
``nvidia-smi``: the script's own steps (find on a tiny local model with dummy weights, then the emitted
command started and answering /health) stay in working order between the runs on a real GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vllm_tuner.launch import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_script_finds_a_config_and_its_command_serves(sim, tmp_path):
    env = sim("h100", time_scale=200)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3, 81559 MiB"\n')
    # the tuner as on a GPU machine, whose NVML is the simulated machine's
    on_sim = tmp_path / "vllm_tune_on_sim.py"
    on_sim.write_text(
        "import sys\nfrom pathlib import Path\n"
        "from vllm_tuner.cli import main\nfrom vllm_tuner.simlite.activate import load_nvml\n"
        f"sys.modules['pynvml'] = load_nvml(Path({str(env.state_dir)!r}))\n"
        "sys.exit(main())\n"
    )
    tune = bin_dir / "vllm-tune"
    tune.write_text(f'#!/bin/sh\nexec {sys.executable} {on_sim} "$@"\n')
    for script in (smi, tune):
        script.chmod(0o755)
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-e2e.sh"), env.vllm_cmd],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            **env.env,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "TUNE": str(tune),
            "E2E_PORT": str(free_port()),
        },
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert '"stable": true' in run.stdout
    assert "--load-format dummy --skip-tokenizer-init" in run.stdout  # passed through to the command
    assert run.stdout.strip().splitlines()[-1] == "gpu-e2e: OK, the emitted command serves"
