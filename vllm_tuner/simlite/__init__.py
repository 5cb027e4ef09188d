"""A simulated vLLM 0.33 and a simulated NVML: the test bed and the no-GPU demo.

The tuner reaches it only through the seams real vLLM uses: a command on ``--vllm-cmd``
(``python -m vllm_tuner.simlite``), a ``pynvml`` module (``activate.load_nvml``), HTTP on loopback.
"""
