"""The shared rules of the pipeline, one module per fact; the phase scripts beside this package use them.

organs (labels, colours, ROI names), layout (the DATA/ tree, run folders, what each phase records),
batch (atomic writes, the batch runner, errors, logging), precision (devices and dtypes), grid (the
network grid and its way back to the CT), ptv (GTV + margin), postprocess, metrics, geometry and
dicom_ct / rtstruct_read / rtstruct_write (DICOM in and out), figures, inference (the one path from a
CT to labels), losses and training (the machinery around the training loop).
"""
