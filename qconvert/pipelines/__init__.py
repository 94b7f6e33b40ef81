"""pipelines stage: the jobs each command runs (convert, quantize, calibrate, imatrix), stage by stage."""
