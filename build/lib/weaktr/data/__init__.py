"""Datasets as WebDataset shards + manifest.json (shards), the built-in synthetic dataset,
converters from VOC / COCO / a plain folder, and the image transforms of both phases."""
