"""onnxruntime sessions: CPU by default, GPU a configuration away (onnxruntime-gpu)."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)


def session(path: Path, *, device: str = "cpu", threads: int = 1) -> ort.InferenceSession:
    """An inference session; ``device="cuda"`` uses CUDA when this onnxruntime has it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            log.warning("%s: CUDA requested but this onnxruntime has no CUDA provider "
                        "(pip install voicebus[gpu]); running on CPU", path.name)
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)
