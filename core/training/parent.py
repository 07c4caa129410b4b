"""Fine-tuning: a training run that starts from a Tessera model's weights (``--init``).

The network is the parent's (architecture, encoder, every weight); when the classes differ
(their names, in order), only the last layer (smp's segmentation head) starts anew. The bands
and the normalization are the parent's, so the data must give as many bands, scaled the same
way (8-bit imagery divided by 255, other types by their own min/max): a mismatch is refused
before anything trains. The model card names the parent and its SHA-256.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError, ParameterError
from ..model.contract import ModelContract
from ..model.files import TesseraModel

log = logging.getLogger(__name__)

#: The part of an smp network that maps features to classes: new when the classes change.
HEAD = "segmentation_head."


@dataclass(frozen=True)
class Parent:
    """The model a run starts from: its file, its model, and whether the classes are its."""

    path: Path
    model: TesseraModel
    same_classes: bool

    def card(self, frozen_epochs: int) -> dict[str, Any]:
        """The model card's record of the parent."""
        c = self.model.contract
        return {"name": c.name, "file": self.path.name, "sha256": self.model.sha256,
                "classes": [k.name for k in c.classes],
                "kept": "every weight" if self.same_classes else
                        "every weight but the last layer (other classes)",
                "encoder_frozen_epochs": frozen_epochs}

    def initialisation(self) -> str:
        """One line for the card's ``initialisation``."""
        c = self.model.contract
        kept = "its whole network" if self.same_classes else \
            "its network but the last layer, new for other classes"
        return f"fine-tuned from model '{c.name}' ({self.path.name}, SHA-256 " \
               f"{self.model.sha256}): {kept}"


def _scaling_text(s: dict[str, Any]) -> str:
    if s.get("method") == "divide":
        return f"divided by {s.get('value'):g}"
    if s.get("method") == "minmax":
        return "stretched by each band's min/max"
    return "as they are"


def open_parent(path: str | Path, n_bands: int, data_scaling: dict[str, Any],
                classes: list[str]) -> Parent:
    """The parent model at ``path`` for data of ``n_bands`` bands scaled as
    ``data_scaling`` (the data's contract ``scaling``) with the class names ``classes``.
    Raises :class:`ParameterError` naming the file and the mismatch, before any training."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        raise ParameterError(f"{path}: an ONNX graph has no trainable weights; start from the "
                             "Tessera model's .safetensors file", path)
    model = TesseraModel.load(path)  # (validated; the weights read now)
    c = model.contract
    if c.runtime:
        raise ModelError(f"{path}: a foreign ONNX model cannot be fine-tuned", path)
    if n_bands != c.in_channels:
        raise ParameterError(
            f"{path}: model '{c.name}' reads {c.in_channels} bands ("
            + ", ".join(c.band_names or [str(b) for b in c.bands])
            + f") but the training data gives {n_bands}; fine-tune it on imagery with its "
            "bands (or choose the bands of the data)", path)
    own = {"method": c.scaling.method, "value": c.scaling.value}
    if data_scaling.get("method") != c.scaling.method or (
            c.scaling.method == "divide" and data_scaling.get("value") != c.scaling.value):
        raise ParameterError(
            f"{path}: model '{c.name}' takes values {_scaling_text(own)} but this training "
            f"data's would be {_scaling_text(data_scaling)} (8-bit imagery is divided by "
            "255, other types stretched by their min/max): fine-tune it on imagery of its "
            "kind", path)
    same = [k.name.lower() for k in c.classes] == [n.lower() for n in classes]
    return Parent(path, model, same)


def parent_contract(parent: Parent, data_contract: ModelContract, name: str) -> ModelContract:
    """The contract of the model a run makes from ``parent``: the parent's network, bands and
    normalization (scaling, mean/std as the data's are checked equal), the data's classes
    and tiles, the data's pixel size (else the parent's)."""
    pc, dc = parent.model.contract, data_contract
    d = dc.to_dict()
    d.update({"name": name, "architecture": pc.architecture, "encoder": pc.encoder,
              "arch_params": dict(pc.arch_params), "in_channels": pc.in_channels,
              "band_names": list(pc.band_names) if pc.band_names else d.get("band_names"),
              "mean": list(pc.mean) if pc.mean else None,
              "std": list(pc.std) if pc.std else None,
              "pixel_size_m": dc.pixel_size_m or pc.pixel_size_m,
              "description": f"{pc.architecture}/{pc.encoder} fine-tuned from '{pc.name}' by "
                             "tessera train"})
    d["scaling"] = pc.to_dict()["scaling"]  # (the parent's min/max too: as it saw values)
    d.pop("weights_sha256", None)
    return ModelContract.from_dict(d)


def load_parent_weights(net: Any, parent: Parent) -> None:
    """Copy the parent's weights into ``net`` (built from :func:`parent_contract`): all of
    them, or all but the head's when the classes differ."""
    state = parent.model.module.state_dict()
    if not parent.same_classes:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    wrong = [k for k in missing if parent.same_classes or not k.startswith(HEAD)]
    if wrong or unexpected:
        raise ModelError(f"{parent.path}: its weights do not fit the network "
                         f"(missing {wrong[:3]}, unexpected {list(unexpected)[:3]})", parent.path)
    log.info("starting from model '%s': %s", parent.model.contract.name,
             "every weight" if parent.same_classes else "every weight but the last layer")


def freeze_encoder(net: Any, frozen: bool) -> None:
    """Freeze (no gradient, batch-norm statistics kept: eval mode) or free the encoder."""
    encoder = getattr(net, "encoder", None)
    if encoder is None:
        return
    for prm in encoder.parameters():
        prm.requires_grad_(not frozen)
    if frozen:
        encoder.eval()
