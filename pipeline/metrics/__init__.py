"""Dataset metrics from the output alone: confusion counts and the IoU family, evaluate, the report."""
