"""The shared rules of the pipeline, one module per fact; the phase scripts beside this package use them.

organs (labels, colours, ROI names), layout and splits (the DATA/ tree, run folders, split files,
what each phase records), batch (atomic writes, the batch runner, errors, logging), precision
(devices and dtypes), grid and image_grid (the network grid and its way back to the CT), ptv
(GTV + margin), postprocess, qa (the quality check of each predicted structure), metrics, geometry,
dicom_ct / rtstruct_read / rtstruct_write (DICOM in and out), cases (prediction's patients in and
outputs out), figures, inference (the one path from a CT to labels), losses and training (the
machinery around the training loop).
"""
