"""Files in the layouts users have them, written from a diffusers model: transformer checkpoints
(:mod:`.checkpoint_files`) and LoRAs (:mod:`.lora_files`).

They live in the package, not in ``tests/``, because two owners need them: the test suite, and the
GPU check (``bench/gpu_check.py``), which runs inside the CUDA image where ``tests/`` is not
installed. Nothing in ``inference`` or ``server`` imports them; they need torch and safetensors (and
``gguf`` for GGUF files), which the package already depends on.
"""
