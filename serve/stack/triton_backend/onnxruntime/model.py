"""A Python-based ``onnxruntime`` backend for Triton (the local, CPU stack).

The nvidia-pytriton wheel's ``tritonserver`` has the Python backend but no native ONNX
Runtime backend. Triton resolves a backend named ``onnxruntime`` from
``<backend-directory>/onnxruntime/model.py`` when no ``libtriton_onnxruntime.so`` is
there, so this file lets the very models that the official GPU image serves with its
native backend (``platform: "onnxruntime_onnx"``) run here unchanged.

- Tensor names and dtypes come from the model config, not from this file.
- Dynamic batching: the requests of one `execute` call are concatenated along the batch
  dimension and run once. A model without a batch dimension (``max_batch_size: 0``, such as
  a bank's adapter table) runs each request on its own and answers its outputs whole.
- String outputs (``TYPE_STRING``, BYTES on the wire) go back as the UTF-8 of ONNX
  Runtime's strings.
- ``parameters { key: "intra_op_thread_count" }`` and ``inter_op_thread_count`` set ONNX
  Runtime's thread counts (the names Triton's native backend reads too); unset, CPU
  instances share the cores (cores / instances each, at least 1) and use one inter-op
  thread. ``allow_spinning`` (``on`` | ``off`` | ``auto``, ours only) says whether idle
  intra-op threads spin-wait; ``auto`` lets a model spin only when it is the only model
  in its repository. Unset it is ``off``: on the 2-core machine measured
  (docs/benchmarks.md) spinning cost the full stack 21% of its throughput with one model
  and 35% with three, because the spinning threads starve the gateway and other models.
- GPU instances use the TensorRT / CUDA execution providers the config asks for
  (``optimization.execution_accelerators``) when this ONNX Runtime has them.
- A failing batch answers each of its requests with an error; the instance lives on.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameter(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _spinning(setting: str, model_folder: str) -> str:
    """``on`` or ``off``: `setting`, where ``auto`` means on for the repository's only model
    (an open-vocabulary model's ``<name>_text``, or a bank's ``<name>_adapters``, beside it
    does not count as another)."""
    if setting in ("on", "off"):
        return setting
    root = os.path.dirname(os.path.abspath(model_folder))
    models = {name for name in os.listdir(root) if os.path.isfile(os.path.join(root, name, "config.pbtxt"))}
    classifiers = {m for m in models
                   if not any(m.endswith(suffix) and m.removesuffix(suffix) in models for suffix in ("_text", "_adapters"))}
    return "on" if len(classifiers) <= 1 else "off"


def _providers(config: dict, kind: str, available: list[str]) -> list:
    if kind != "GPU":
        return ["CPUExecutionProvider"]
    providers: list = []
    accelerators = config.get("optimization", {}).get("execution_accelerators", {}).get("gpu_execution_accelerator", [])
    for accelerator in accelerators:
        if accelerator.get("name") == "tensorrt" and "TensorrtExecutionProvider" in available:
            fp16 = accelerator.get("parameters", {}).get("precision_mode", "") == "FP16"
            providers.append(("TensorrtExecutionProvider", {"trt_fp16_enable": fp16}))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    return providers + ["CPUExecutionProvider"]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)

        kind = args.get("model_instance_kind", "CPU")
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        default_threads = max(1, (os.cpu_count() or 1) // instances) if kind == "CPU" else 0
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_thread_count", str(default_threads)))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_thread_count", "1"))
        spinning = "off"
        if kind == "CPU":
            spinning = _spinning(_parameter(config, "allow_spinning", "off"), args["model_repository"])
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning == "on" else "0")
        # fp16 graphs crash ORT_ENABLE_ALL's CPU layout passes (see cliplora/core/runtime.py); int8 and fp32 take it.
        fp16 = _parameter(config, "precision", "fp32") == "fp16"
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if fp16 else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        providers = _providers(config, kind, ort.get_available_providers())
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.logger = pb_utils.Logger
        self.logger.log_info(f"onnxruntime backend: {path} on {self.session.get_providers()}, "
                             f"{options.intra_op_num_threads} intra-op threads (spinning {spinning}), "
                             f"{instances} instance(s)")

    def execute(self, requests: list) -> list:
        groups = [requests] if self.batching else [[request] for request in requests]
        return [response for group in groups for response in self._execute(group)]

    def _execute(self, requests: list) -> list:
        try:
            arrays = {
                name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(dtype, copy=False) for r in requests]
                for name, dtype in self.inputs
            }
            sizes = [len(a) for a in arrays[self.inputs[0][0]]]
            feeds = {name: np.concatenate(parts) for name, parts in arrays.items()}
            results = self.session.run([name for name, _ in self.outputs], feeds)
        except Exception as exc:  # answer every request of the batch; keep the instance alive
            error = pb_utils.TritonError(f"onnxruntime backend: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

        if not self.batching:  # one request, its outputs whole
            sizes = [None]
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result if size is None else result[start : start + size])
                                .astype(dtype, copy=False))
                for (name, dtype), result in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size or 0
        return responses

    def finalize(self) -> None:
        self.session = None
