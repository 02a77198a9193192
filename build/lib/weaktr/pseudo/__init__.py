"""CAMs -> pseudo-labels at cluster scale (SPEC.md, "From CAMs to pseudo-labels"): a Ray Data pipeline.

    shards --read--> chunk rows --CAM actors--> per-image rows --CRF actors--> driver --> per-shard commit

- **read** (Ray tasks, one per input shard): decode every sample once to validate it; broken samples and samples
  without labels become failure rows. Valid samples are sorted by image size and cut into chunks of
  ``pseudo.batch_size`` images, so same-size images share forward passes. A row carries the original encoded image
  bytes, never decoded pixels.
- **CAM** (actor pool, GPU where configured): per chunk, ``multiscale_cams`` (every scale's same-grid images and
  their flips in one forward pass), the CAM label (``ops.cam_to_label``) and, where a GT mask exists, the CAM
  label's confusion matrix and the background-threshold sweep histogram (tiny, sparse): float CAMs never leave
  the actor unless ``save_cams``. Emits one row per image (and per failure).
- **CRF** (CPU actor pool): dense CRF on the CAM label -> pseudo-label (+ its confusion matrix).
- **driver**: collects each shard's rows (every row carries its shard's row count, known after reading) and commits
  the shard once all have arrived: PNGs, overlays, CAM arrays, then the output tar (the input samples copied
  verbatim plus ``{key}.pseudo.png``), each written under a temporary name and renamed, and *last* the shard's
  stats file ``stats/{shard}.json`` (confusion matrices, sweep counts, failures): the shard's "done" marker.

Resuming: shards with a stats file are skipped; stale ``*.tmp`` files are removed at start; a shard that was
half-committed is redone and rewrites the same bytes. The final outputs (manifest.json, failures.jsonl,
report.json, bg_sweep.csv/png) are always rebuilt from all the stats files. Outputs are deterministic: a chunk's
composition depends only on its shard (not on which shards run or how Ray batches rows), so an interrupted and
resumed run writes the same bytes as an uninterrupted one (on the same hardware). ``run_config.json`` records
what the outputs were made from (checkpoint hash, data, settings); resuming with different settings is refused
(use ``overwrite``). One run per output directory at a time.

Output layout (``pseudo.out_dir``)::

    manifest.json, {shard}.tar        a dataset: the split's samples, each with {key}.pseudo.png
    pseudo_png/{key}.png              VOC-palette pseudo-labels
    cams/{key}.npy                    (save_cams) float32 [P, H, W]: normalized CAMs of the image's labels, in order
    overlays/{key}.jpg                CAM heat-map overlays of the first ``overlay_samples`` samples of the split
    failures.jsonl, report.json, bg_sweep.csv, bg_sweep.png, stats/{shard}.json, run_config.json
"""

from weaktr.pseudo.run import PseudoLabelError, format_report, run_pseudo_labels
from weaktr.pseudo.stages import CamStage, CrfStage, StageSettings, load_cam_model

__all__ = ["CamStage", "CrfStage", "PseudoLabelError", "StageSettings", "format_report", "load_cam_model",
           "run_pseudo_labels"]
