"""`edgekit inspect` for safetensors and ONNX files (GGUF lives in gguf_read): metadata,
tensors, types and sizes, and a clear error for a file that is not what it claims."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError


def inspect_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = []
            for name in f.keys():
                sl = f.get_slice(name)
                tensors.append({"name": name, "type": sl.get_dtype(), "shape": list(sl.get_shape())})
    except Exception as e:
        raise EdgekitError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                           "re-export or re-download it; a truncated copy cannot be repaired") from None
    return {"format": "safetensors", "metadata": meta, "tensors": tensors}


def inspect_onnx(path: Path) -> dict:
    import onnx

    target = path / "model.onnx" if path.is_dir() else path
    try:
        model = onnx.load(str(target), load_external_data=False)
    except Exception as e:
        raise EdgekitError(f"{target} is not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                           "re-export it (export formats: [onnx_int4]); a truncated copy cannot be repaired") from None
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    tensors = [{"name": t.name, "type": onnx.TensorProto.DataType.Name(t.data_type), "shape": list(t.dims)}
               for t in model.graph.initializer]
    meta = {"ir_version": model.ir_version, "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(), "ops": ops}
    return {"format": "onnx", "metadata": meta, "tensors": tensors}
