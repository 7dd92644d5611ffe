"""The calibration artifact: ``calibration.safetensors`` + ``calibration.json`` in one folder.

Bit-identical for a fixed seed on the same machine and software (no timestamps inside).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..export.format import CheckpointError, KeyLayout, tensor_name, value_rotations_per_layer
from ..outdir import atomic_dir

__all__ = ["ARTIFACT_VERSION", "CalibrationArtifact", "save_artifact", "load_artifact", "weights_fingerprint"]

ARTIFACT_VERSION = 4  # 2: key_scale (an rkv that reads only version 1 would export without fusing it); 3: value_head_rotation;
# 4: key_first_token
READABLE_VERSIONS = (1, 2, 3, 4)
TENSORS_FILE = "calibration.safetensors"
META_FILE = "calibration.json"
# key_head_rotation: folded layout with learned rotations, fp32 [n_kv, d, d]; key/value_group_range: fp32 [],
# the largest unclipped group range of stored keys / values (folded layout; what 8-bit group metadata needs);
# key_error_by_bits: fp32 [3], the clip search's key error at 2, 3 and 4 bits (what `export --key-bits auto` ranks);
# key_induction: fp32 [n_kv], each KV head's induction score (calibrate.retrieval; `export --key-bits retrieval`);
# key_scale: fp32 [n_kv*d], the key scale (calibrate.key_scale) in the channel order attention handlers see; every
# other key statistic of the layer (mean, clips, rotations, ranges) is of the scaled keys;
# value_head_rotation: fp32 [n_kv, d, d], each KV head's learned value rotation (replaces value_rotation for the layer;
# its value clips and group range are of the values it rotates);
# key_first_token: fp32 [n_kv, d], the mean centred key of the windows' first token (folded; export.first_key)
OPTIONAL_PER_LAYER = ("key_head_rotation", "key_group_range", "value_group_range", "key_error_by_bits", "key_induction",
                      "key_scale", "value_head_rotation", "key_first_token")
PER_LAYER = (
    "key_mean",
    "key_perm",
    "key_abs_mean_before",
    "key_abs_mean_after",
    "key_clip_by_bits",
    "value_clip_by_bits",
    "sink_channels",
    "sink_threshold",
)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (ties counted once)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class CalibrationArtifact:
    """What ``rkv calibrate`` learned; ``meta`` holds model shape, options and fingerprint."""

    meta: dict
    key_rotation: torch.Tensor
    value_rotation: torch.Tensor
    layers: list[dict[str, torch.Tensor]]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def key_layout(self) -> str:
        """The calibrated key layout (a :class:`KeyLayout` value); artifacts from before the option: pre-RoPE."""
        return self.meta["options"].get("key_layout", KeyLayout.PREROPE.value)

    @property
    def key_scales(self) -> list[torch.Tensor] | None:
        """Each layer's key scale (fused into the model's weights at export), or ``None`` where none was calibrated."""
        if "key_scale" not in self.layers[0]:
            return None
        return [layer["key_scale"] for layer in self.layers]

    @property
    def value_rotations(self) -> list[torch.Tensor]:
        """Each layer's value rotation per KV head, fp32 ``[n_kv, d, d]`` (fused into the weights at export): the
        learned ``value_head_rotation``, else ``value_rotation`` for every head."""
        return value_rotations_per_layer(self.value_rotation, [layer.get("value_head_rotation") for layer in self.layers],
                                         self.meta["model"]["num_key_value_heads"])  # fmt: skip

    def clip_for(self, layer: int, bits: int, which: str = "key") -> float:
        table = self.layers[layer][f"{which}_clip_by_bits"]
        return float(table[self.meta["options"]["bits_searched"].index(bits)])


def save_artifact(artifact: CalibrationArtifact, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write to a temporary folder beside ``out_dir`` and rename it into place at the end (:mod:`rkv_convert.outdir`)."""
    out = Path(out_dir)
    tensors = {"key_rotation": artifact.key_rotation.contiguous(), "value_rotation": artifact.value_rotation.contiguous()}
    for i, layer in enumerate(artifact.layers):
        for key in PER_LAYER + OPTIONAL_PER_LAYER:
            if key in layer:
                tensors[tensor_name(i, key)] = layer[key].contiguous()
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "rkv-calibration"})
        (tmp / META_FILE).write_text(json.dumps(artifact.meta, indent=2, sort_keys=True) + "\n")
    return out


def load_artifact(path: str | Path) -> CalibrationArtifact:
    """Read and validate an artifact folder; errors name the problem and the fix."""
    folder = Path(path)
    meta_path, tensors_path = folder / META_FILE, folder / TENSORS_FILE
    if not meta_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(f"{folder} is not a calibration artifact (needs {META_FILE} and {TENSORS_FILE}); run `rkv calibrate`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is corrupt: {err}") from err
    if meta.get("artifact_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"calibration artifact version {meta.get('artifact_version')} is not supported (this rkv reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-run `rkv calibrate` with this rkv"
        )
    try:
        tensors = load_file(str(tensors_path))
    except Exception as err:
        raise CheckpointError(f"{tensors_path} is corrupt: {err}") from err
    model = meta["model"]
    channels = model["num_key_value_heads"] * model["head_dim"]
    layers = []
    for i in range(model["num_hidden_layers"]):
        layer = {}
        for key in PER_LAYER:
            name = tensor_name(i, key)
            if name not in tensors:
                raise CheckpointError(f"{tensors_path} lacks {name}; the artifact is incomplete, re-run `rkv calibrate`")
            layer[key] = tensors[name]
        for key in OPTIONAL_PER_LAYER:
            if tensor_name(i, key) in tensors:
                layer[key] = tensors[tensor_name(i, key)]
        heads = (model["num_key_value_heads"], model["head_dim"], model["head_dim"])
        if any(layer[key].shape != (channels,) for key in ("key_mean", "key_perm", "key_scale") if key in layer) or any(
                layer[key].shape != heads for key in ("key_head_rotation", "value_head_rotation") if key in layer) or (
                "key_first_token" in layer and layer["key_first_token"].shape != heads[:2]):
            raise CheckpointError(f"{tensors_path} layer {i}: shapes do not match the model recorded in {meta_path}; "
                                  "re-run `rkv calibrate`")  # fmt: skip
        layers.append(layer)
    return CalibrationArtifact(meta, tensors["key_rotation"], tensors["value_rotation"], layers)
