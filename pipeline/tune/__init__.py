"""deeplab tune-crf: the CRF's parameters cross-validated on Ray Tune, and its report."""
