"""Transfer tasks on a pretrained image tower: classification (:mod:`.classify`)."""

from mlip_core.transfer.classify import (
    ClassificationTask,
    Encoder,
    ProbeResult,
    auroc_per_label,
    build_tower,
    encoder_from_export,
    extract_features,
    find_exports,
    fraction_masks,
    linear_probe,
    offline_world_task,
    probe_sweep,
    raw_pixel_features,
    summarise,
)

__all__ = [
    "ClassificationTask",
    "Encoder",
    "ProbeResult",
    "auroc_per_label",
    "build_tower",
    "encoder_from_export",
    "extract_features",
    "find_exports",
    "fraction_masks",
    "linear_probe",
    "offline_world_task",
    "probe_sweep",
    "raw_pixel_features",
    "summarise",
]
