"""Data tools: phantoms, DICOM series, the sample CT, MSD mini-tasks, BTCV and pre-training datalists."""
