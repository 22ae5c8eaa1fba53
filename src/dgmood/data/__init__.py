"""Datasets: specs, IDX / npy / npz arrays, image folders and archives, the image policy, streaming, releases, toy manifolds."""

from dgmood.data.datasets import (DATA_ENV, DEFAULT_N, DEFAULT_SHAPE, SPLITS, SYNTHETIC, DataError, Spec,
                                  dataset_file, describe, download, load_images, load_labels, parse_spec,
                                  read_idx, resolve_data_dir, write_idx)

__all__ = ["DATA_ENV", "DEFAULT_N", "DEFAULT_SHAPE", "SPLITS", "SYNTHETIC", "DataError", "Spec", "dataset_file",
           "describe", "download", "load_images", "load_labels", "parse_spec", "read_idx", "resolve_data_dir",
           "write_idx"]
