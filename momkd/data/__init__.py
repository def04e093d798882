"""Data layer (numpy/h5py only): slide feature files, omics, cohort tables, splits and validation."""
