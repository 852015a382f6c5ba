"""Helpers shared by the serving tests."""

from __future__ import annotations

import json
import shutil


def derive_export(src, dst, bias_shift: float):
    """A copy of an export whose heads' bias moved: another model (new hash, new scores)."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    for task in sorted(p.parent.name for p in dst.glob("*/model.onnx")):
        path = dst / task / "model.onnx"
        graph = onnx.load(str(path))
        gemm = [n for n in graph.graph.node if n.op_type == "Gemm"][-1]  # the task head
        for init in graph.graph.initializer:
            if init.name == gemm.input[2]:
                init.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(init) + bias_shift, init.name)
                )
        onnx.save(graph, str(path))
        meta_path = dst / task / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["model_version"] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        meta_path.write_text(json.dumps(meta))
    return dst
